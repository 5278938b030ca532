"""The A/B benchmark's report: the Markdown table with B/A ratios, the plot, and the files a run
leaves in --out."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from heapr_serve.ab.bench import Plan, describe_schedule
from heapr_serve.ab.intervals import verdict
from heapr_serve.ab.metrics import ABMetrics


# the ratios the verdict table reads: (column, ratio key, lower is better)
VERDICT_KEYS = [("TTFT p50", "ttft_ms_p50", True), ("ITL mean", "itl_ms_mean", True), ("E2E p50", "e2e_ms_p50", True),
                ("E2E p99", "e2e_ms_p99", True), ("out tok/s", "output_tokens_per_s", False), ("error rate", "error_rate", True)]


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_report(report: dict) -> str:
    plan, arms = report["plan"], report["arms"]
    mode = plan["mode"]
    xname = "concurrency" if mode == "concurrency" else "req/s"
    lines = [f"# A/B benchmark: A = {arms['a']['model']} vs B = {arms['b']['model']}", "",
             f"- A: `{arms['a']['source']}`; B: `{arms['b']['source']}`",
             f"- schedule: {report['schedule']}",
             f"- {plan['num_prompts']} requests per arm per level, endpoint `{plan['endpoint']}`, "
             f"output {plan['output_len']} tokens (ignore_eos={plan['ignore_eos']}), "
             + (f"synthetic input {plan['input_len']} tokens" if not report.get("prompt_file")
                else f"prompts from `{report['prompt_file']}`"),
             f"- command: `{report['command']}`", "",
             f"| {xname} | arm | TTFT p50 / p90 / p99 (ms) | TPOT p50 (ms) | ITL mean / p99 (ms) | "
             "E2E p50 / p90 / p99 (ms) | out tok/s | req/s | errors (timeouts) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lv in report["levels"]:
        x = lv[mode]
        for arm in ("a", "b"):
            s = lv[arm]
            t, e = s["ttft_ms"] or {}, s["e2e_ms"] or {}
            lines.append(
                f"| {x:g} | {arm.upper()} | {_fmt(t.get('p50'))} / {_fmt(t.get('p90'))} / "
                f"{_fmt(t.get('p99'))} | {_fmt((s['tpot_ms'] or {}).get('p50'), 2)} | "
                f"{_fmt((s['itl_ms'] or {}).get('mean'), 2)} / {_fmt((s['itl_ms'] or {}).get('p99'), 1)} | "
                f"{_fmt(e.get('p50'))} / "
                f"{_fmt(e.get('p90'))} / {_fmt(e.get('p99'))} | {_fmt(s['output_tokens_per_s'])} | "
                f"{_fmt(s['requests_per_s'], 2)} | {s['errors']} ({s.get('timeouts', 0)}) |")
        r = lv["b_over_a"]
        lines.append(
            f"| {x:g} | **B/A** | {_fmt(r['ttft_ms_p50'], 2)} / {_fmt(r['ttft_ms_p90'], 2)} / "
            f"{_fmt(r['ttft_ms_p99'], 2)} | {_fmt(r['tpot_ms_p50'], 2)} | {_fmt(r['itl_ms_mean'], 2)} / "
            f"{_fmt(r['itl_ms_p99'], 2)} | "
            f"{_fmt(r['e2e_ms_p50'], 2)} / {_fmt(r['e2e_ms_p90'], 2)} / {_fmt(r['e2e_ms_p99'], 2)} | "
            f"{_fmt(r['output_tokens_per_s'], 2)} | {_fmt(r['requests_per_s'], 2)} | {_error_ratio(lv)} |")
    if any(lv.get("b_over_a_interval") for lv in report["levels"]):
        pct = f"{report.get('confidence', 0.95) * 100:g}%"
        lines += ["", f"B/A with {pct} intervals (paired over blocks, for all of a level's ratios together; one block: a "
                  "paired bootstrap over prompts; an interval holding 1.0 means no difference was measured):", "",
                  f"| {xname} | " + " | ".join(label for label, _, _ in VERDICT_KEYS) + " |",
                  "|---|" + "---|" * len(VERDICT_KEYS)]
        for lv in report["levels"]:
            cells = []
            for _, key, lower_is_better in VERDICT_KEYS:
                ratio, interval = lv["b_over_a"].get(key), (lv.get("b_over_a_interval") or {}).get(key)
                shown = "-" if ratio is None else f"{ratio:.2f}"
                if interval is not None:
                    shown += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
                cells.append(f"{shown} {verdict(ratio, interval, lower_is_better)}")
            lines.append(f"| {lv[mode]:g} | " + " | ".join(cells) + " |")
    lines += ["", "Error rates count every failed request; a request that timed out also enters TTFT and E2E "
              "at the moment it was given up (a censored sample: its latency was at least that).",
              "", "Servers' own vLLM metrics over the measured run (from their `/metrics`):", "",
              "| arm | generation tokens (vLLM) | output tokens (client) | prompt tokens (vLLM) | "
              "server TTFT / ITL / E2E mean (ms) | peak KV-cache usage | peak running | "
              "peak waiting | preemptions |",
              "|---|---|---|---|---|---|---|---|---|"]
    for arm in ("a", "b"):
        v = report["vllm"][arm]
        if "note" in v:
            lines.append(f"| {arm.upper()} | {v['note']} | | | | | | | |")
            continue
        kv = v.get("peak_kv_cache_usage")
        lines.append(
            f"| {arm.upper()} | {_fmt(v.get('generation_tokens_delta'), 0)} | "
            f"{v['client_output_tokens']} | {_fmt(v.get('prompt_tokens_delta'), 0)} | "
            f"{_fmt(v.get('server_ttft_ms_mean'))} / {_fmt(v.get('server_itl_ms_mean'), 2)} / "
            f"{_fmt(v.get('server_e2e_ms_mean'))} | "
            f"{'-' if kv is None else f'{kv * 100:.2f}%'} | {_fmt(v.get('peak_requests_running'), 0)} | "
            f"{_fmt(v.get('peak_requests_waiting'), 0)} | {_fmt(v.get('preemptions_delta'), 0)} |")
    return "\n".join(lines) + "\n"


def _error_ratio(level: dict) -> str:
    """B's error rate over A's, or what stands for it when A had none."""
    ratio, eb = level["b_over_a"].get("error_rate"), level["b"].get("error_rate")
    if ratio is None and eb:
        return f"B only ({eb:.1%})"
    return _fmt(ratio, 2)


def plot_report(report: dict, path: Path) -> bool:
    """Latency and throughput against load, both arms, and the B/A ratios with their intervals, in one
    small PNG; False (nothing written) when
    matplotlib, the `plot` extra, is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = report["plan"]["mode"]
    xs = [lv[mode] for lv in report["levels"]]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12.0, 3.2), dpi=100)
    colors = {"a": "#4C72B0", "b": "#DD8452"}
    for arm in ("a", "b"):
        label = f"{arm.upper()} {report['arms'][arm]['model']}"

        def get(metric: str, q: str = "p50") -> list[float]:
            return [(lv[arm][metric] or {}).get(q, float("nan")) for lv in report["levels"]]

        ax1.plot(xs, get("e2e_ms"), "o-", color=colors[arm], label=f"{label} E2E p50")
        ax1.plot(xs, get("ttft_ms"), "s--", color=colors[arm], alpha=0.7, label=f"{label} TTFT p50")
        ax2.plot(xs, [lv[arm]["output_tokens_per_s"] or float("nan") for lv in report["levels"]],
                 "o-", color=colors[arm], label=label)
    for i, (label, key, _) in enumerate(VERDICT_KEYS[:5]):  # B/A ratios with their 95% intervals
        ratio = [lv["b_over_a"].get(key) for lv in report["levels"]]
        spans = [(lv.get("b_over_a_interval") or {}).get(key) for lv in report["levels"]]
        shift = [x * (1 + 0.03 * (i - 2)) for x in xs]  # side by side at each load
        lo = [max(0.0, r - sp[0]) if r is not None and sp else 0.0 for r, sp in zip(ratio, spans)]
        hi = [max(0.0, sp[1] - r) if r is not None and sp else 0.0 for r, sp in zip(ratio, spans)]
        ax3.errorbar(shift, [float("nan") if r is None else r for r in ratio], yerr=[lo, hi], fmt="o", capsize=3,
                     label=label)
    ax3.axhline(1.0, color="grey", lw=0.8)
    ax3.set_ylabel("B / A")
    ax3.set_title(f"B/A ratio, {report.get('confidence', 0.95) * 100:g}% interval", fontsize=10)
    ax3.legend(fontsize=7)
    xl = "concurrency" if mode == "concurrency" else "request rate (req/s)"
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel(xl)
        if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 4:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.grid(alpha=0.3)
    ax1.set_ylabel("latency (ms)")
    ax1.set_title("latency", fontsize=10)
    ax2.set_ylabel("output tokens/s")
    ax2.set_title("throughput", fontsize=10)
    ax2.set_ylim(bottom=0)
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_reports(folder: Path, arms, plan: Plan, prompts, metrics: ABMetrics, run: dict) -> tuple[str, bool]:
    """results.json, results.md, plot.png and metrics.prom into the staging `folder` (it becomes
    --out); returns the Markdown and whether a plot was drawn."""
    command = "heapr-serve " + " ".join(_quote(x) for x in sys.argv[1:])

    report = {
        "tool": "heapr-serve bench", "command": command, "schedule": describe_schedule(plan), "confidence": plan.confidence,
        "plan": asdict(plan),
        "arms": {n: {"source": arm.source, "url": arm.url, "model": arm.model,
                     "served_here": arm.served_here} for n, arm in arms.items()},
        "prompt_file": str(prompts) if prompts else None,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": sys.platform},
        **run,
    }
    md = markdown_report(report)
    (folder / "results.json").write_text(json.dumps(report, indent=2))
    (folder / "results.md").write_text(md)
    plotted = plot_report(report, folder / "plot.png")
    (folder / "metrics.prom").write_bytes(metrics.exposition())
    return md, plotted


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
