"""Methods x ratios -> perplexity, lm-eval accuracy, parameters and effective ratio: a Markdown table,
a JSON file and a PNG plot of perplexity against the share of expert parameters removed.

Why: "what does pruning cost in quality, and is HEAPr better than dropping whole experts?" needs
numbers from the same pipeline for every method. The dense model is calibrated once; every method and
ratio is pruned from those statistics through `to_folder.prune_to_folder` (the path `compress` and
`apply` use) and evaluated the same way.

- perplexity through transformers (held-out built-in text, windows of --seq-len);
- lm-eval tasks (default: the bundled offline `heapr_local` tasks), through a vLLM endpoint per
  checkpoint (`--backend endpoint`: exactly what users run) or in-process with lm-eval's `hf` model on
  heapr-serve's transformers loader (`--backend transformers`: no server start per checkpoint);
- `--endpoint-ppl`: also serve each checkpoint with vLLM and measure the same perplexity through the
  endpoint (prompt logprobs), to show both paths agree.

A method may carry a re-fit (`compress --reconstruct`): `heapr+reconstruct` (layer by layer on the
pruned model's inputs, the default), `heapr+reconstruct-dense` (on the dense model's), and the same for
any method (`fisher+reconstruct`); `all+` adds every method's reconstructed rows. `+heal` adds
`--heal` with its defaults and `+e2e` `--heal-e2e` (`fisher+reconstruct+heal+e2e`). A last suffix
naming a `--quantize` scheme quantizes the pruned checkpoint in the same run, by GPTQ (`heapr+w4a16`)
or round to nearest (`heapr+w4a16-rtn`), with the group chosen as `compress --quantize` chooses it
(so also pass that --align to the bf16 rows you compare with); ratio 0 is the dense model in the
pruned format (`--ratios 0,0.25`), so `heapr+w4a16` at 0 is dense + GPTQ.

Usage:
    python -m tools.quality_table [MODEL] --ratios 0.25,0.5 --methods all --out docs
    python -m tools.quality_table --methods heapr,fisher,heapr+reconstruct,fisher+reconstruct --ratios 0.25,0.5,0.75
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "examples" / "tiny-qwen3-moe"
# next sentence: acc_mutual_info (log p(choice|context) - log p(choice)) measures how much the context
# helps; plain acc is at chance for a model as small as the bundled one (all metrics are in the JSON)
TASK_COLUMNS = [("heapr_nextsent", "acc_mutual_info", "next-sentence acc (MI)"), ("heapr_cloze", "acc", "cloze acc")]


def calibrate(source: Path, nsamples: int, seq_len: int, batch_size: int, seed: int):
    """One forward + backward pass over the calibration set, collecting every method's statistics."""
    from heapr_serve.calibrate.datasets import load_calibration
    from heapr_serve.prune.to_folder import check_source
    from heapr_serve.score.calibration_pass import collect_statistics
    from heapr_serve.models import load_model, load_tokenizer
    from heapr_serve.progress import progress_bar

    config = check_source(source)
    tokenizer = load_tokenizer(source)
    calibration = load_calibration(None, tokenizer, nsamples, seq_len, seed, int(config["vocab_size"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    model = load_model(source, torch.float32, torch.device("cpu"))
    with progress_bar() as progress:
        task = progress.add_task("calibration (all methods)", total=calibration.num_tokens)
        batches = list(calibration.batches(batch_size, pad_id))
        stats = collect_statistics(model, batches, float(batch_size * calibration.seq_len), lambda n: progress.advance(task, n))
    stats.metadata.update({"source_model": str(source), "model_type": config["model_type"], "calibration": calibration.describe()})
    return stats, batches


def parse_method(spec: str) -> tuple[str, dict | None]:
    """'fisher+reconstruct' -> ('fisher', PruneOptions keywords); 'heapr' -> ('heapr', None);
    'heapr+reconstruct-dense', 'heapr+heal', 'fisher+reconstruct+heal+e2e' likewise (the quantize
    suffix is split off by parse_quantize)."""
    from heapr_serve.prune.heal import DEFAULT_E2E_STEPS, HealOptions

    name, *stages = parse_quantize(spec)[0].split("+")
    if any(s not in ("reconstruct", "reconstruct-dense", "heal", "e2e") for s in stages) or ("e2e" in stages and "heal" not in stages):
        raise ValueError(f"--methods {spec!r}: the suffixes are +reconstruct or +reconstruct-dense, then +heal, then +e2e")
    if not stages:
        return name, None
    heal = HealOptions(e2e_steps=DEFAULT_E2E_STEPS if "e2e" in stages else 0) if "heal" in stages else None
    refit = "reconstruct" in stages or "reconstruct-dense" in stages
    return name, {"reconstruct_inputs": "dense" if "reconstruct-dense" in stages else "pruned", "reconstruct": refit or heal is None, "heal": heal}


def parse_quantize(spec: str):
    """'heapr+w4a16' -> ('heapr', QuantizeOptions('w4a16', 'gptq')); 'heapr+w4a16-rtn' -> rtn; else (spec, None)."""
    from heapr_serve.quantize.options import QuantizeOptions
    from heapr_serve.quantize.schemes import SCHEMES

    head, _, last = spec.rpartition("+")
    scheme, method = (last[: -len("-rtn")], "rtn") if last.endswith("-rtn") else (last, "gptq")
    if head and scheme in SCHEMES:
        return head, QuantizeOptions(scheme, method)
    return spec, None


def evaluate_folder(folder: Path, args, tokens, port: int, serve: bool) -> dict:
    """Perplexity (transformers; and through a vLLM endpoint when `serve`) and lm-eval results for one
    checkpoint. Served checkpoints also run lm-eval through the endpoint, to compare with transformers."""
    from heapr_serve.errors import HeaprError
    from heapr_serve.eval.endpoint import endpoint_perplexity
    from heapr_serve.eval.harness import run_lm_eval_endpoint, run_lm_eval_local
    from heapr_serve.eval.perplexity import perplexity
    from heapr_serve.ab.local_vllm import LocalVllmServer
    from heapr_serve.models import load_model

    row: dict = {}
    model = load_model(folder, torch.float32, torch.device("cpu"))
    row["ppl"] = perplexity(model, tokens, args.seq_len, 8)
    del model
    if args.tasks and args.backend == "transformers":
        row["lm_eval"] = run_lm_eval_local(folder, args.tasks, limit=args.limit, batch_size=32)
    if serve or args.backend == "endpoint":
        # vLLM-CPU's quantized linear kernel (cpu_gemm_wna16) has no float32 path: quantized folders serve in bfloat16
        quantized = "quantization_config" in json.loads((folder / "config.json").read_text())
        extra = ["--dtype", "bfloat16" if quantized else "float32", "--max-model-len", str(max(args.seq_len, 1024))]
        try:
            with LocalVllmServer(folder, extra=extra, log=args.workdir / f"vllm-{folder.name}.log", port=port,
                                 env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
                row["ppl_endpoint"] = endpoint_perplexity(server.url, tokens, args.seq_len, 8)
                if args.tasks:
                    results = run_lm_eval_endpoint(server.url, args.tasks, str(folder), limit=args.limit, batch_size=16)
                    row["lm_eval_endpoint" if args.backend == "transformers" else "lm_eval"] = results
        except HeaprError as err:  # e.g. the vLLM plugin cannot load this folder yet: say so in the table
            row["endpoint_error"] = str(err)
    return row


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(report: dict) -> str:
    rows, dense = report["rows"], report["rows"][0]
    has_endpoint = any("ppl_endpoint" in r for r in rows)
    tasks = [(t, m, label) for t, m, label in TASK_COLUMNS if any(t in r.get("lm_eval", {}) for r in rows)]
    head = ["method", "ratio", "effective ratio", "parameters", "perplexity", "vs dense"]
    head += ["endpoint perplexity"] if has_endpoint else []
    head += [label for _, _, label in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["method"], _fmt(r["ratio"], ".2f"), _fmt(r["effective_ratio"], ".4f"), f"{r['params']:,}",
                 _fmt(r["ppl"], ".3f"), f"{r['ppl'] / dense['ppl'] - 1:+.1%}"]
        if has_endpoint:
            cells.append(_fmt(r.get("ppl_endpoint"), ".3f"))
        for task, metric, _ in tasks:
            result = r.get("lm_eval", {}).get(task, {})
            value, stderr = result.get(metric), result.get(metric + "_stderr")
            cells.append(_fmt(value, ".3f") + (f" ± {stderr:.3f}" if isinstance(stderr, float) and stderr == stderr else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def claims(report: dict) -> list[str]:
    """The issue's claims, checked on the numbers just measured (no figure is typed in by hand)."""
    rows, dense = report["rows"], report["rows"][0]["ppl"]
    out = []
    by = {(r["method"], r["ratio"]): r for r in rows[1:]}
    for ratio in report["ratios"]:
        at = {m: by[(m, ratio)]["ppl"] for m in report["methods"] if (m, ratio) in by}
        if "heapr" in at and len(at) > 1:
            best = min(at, key=at.get)
            ranked = ", ".join(f"{m} {p:.2f}" for m, p in sorted(at.items(), key=lambda kv: kv[1]))
            out.append(f"ratio {ratio:g}: lowest perplexity is **{best}** ({'holds' if best == 'heapr' else 'does NOT hold'} for HEAPr); ranking: {ranked}")
        if "heapr" in at:
            for other in [m for m in at if m != "heapr" and ("+" in m or m == "fisher") and parse_quantize(m)[1] is None]:
                share = (at[other] - dense) / (at["heapr"] - dense) if at["heapr"] > dense else float("inf")
                out.append(f"ratio {ratio:g}: perplexity increase {other} {at[other] - dense:+.3f} vs heapr {at['heapr'] - dense:+.3f}: "
                           f"{share:.2f}x HEAPr's" + (f" (claim for --reconstruct at 0.5: at most 0.45x, {'holds' if share <= 0.45 else 'does NOT hold'})"
                                                       if ratio == 0.5 and other == "heapr+reconstruct" else ""))
        if "heapr" in at and "reap" in at:
            h, r = at["heapr"] - dense, at["reap"] - dense
            share = h / r if r > 0 else float("inf")
            out.append(f"ratio {ratio:g}: perplexity increase HEAPr {h:+.3f} vs REAP-style experts {r:+.3f} "
                       f"(effective ratios {by[('heapr', ratio)]['effective_ratio']:.4f} / {by[('reap', ratio)]['effective_ratio']:.4f}): "
                       f"HEAPr's is {share:.1%} of REAP's" + (" (claim: at most a third, " + ("holds)" if share <= 1 / 3 else "does NOT hold)") if ratio == 0.25 else ""))
    for ratio in report["ratios"]:  # quantization: each quantized row against its own bf16 row, GPTQ against RTN
        at = {m: by[(m, ratio)]["ppl"] for m in report["methods"] if (m, ratio) in by}
        for gptq in [m for m in at if parse_quantize(m)[1] is not None and parse_quantize(m)[1].method == "gptq"]:
            base, rtn = parse_quantize(gptq)[0], f"{gptq}-rtn"
            if base in at and rtn in at and at[rtn] > at[base]:
                g, r = at[gptq] - at[base], at[rtn] - at[base]
                out.append(f"ratio {ratio:g}: {gptq} costs {g:+.3f} perplexity over {base} in bf16, round to nearest {r:+.3f}: "
                           f"GPTQ's increase is {g / r:.2f}x RTN's (claim: at most 0.5x, {'holds' if g <= 0.5 * r else 'does NOT hold'})")
    pairs = [(r["ppl"], r["ppl_endpoint"]) for r in rows if r.get("ppl_endpoint") is not None]
    if pairs:
        worst = max(abs(e / t - 1) for t, e in pairs)
        out.append(f"endpoint vs transformers perplexity: largest relative difference {worst:.4%} over {len(pairs)} checkpoints "
                   f"({'within' if worst <= 0.01 else 'NOT within'} 1%)")
    diffs = [abs(r["lm_eval"][t][m] - r["lm_eval_endpoint"][t][m]) for r in rows if "lm_eval_endpoint" in r and "lm_eval" in r
             for t in r["lm_eval_endpoint"] for m in r["lm_eval_endpoint"][t] if not m.endswith("_stderr") and m in r["lm_eval"].get(t, {})]
    if diffs:
        out.append(f"lm-eval through the endpoint vs through transformers: largest absolute difference {max(diffs):.4f} over {len(diffs)} task metrics")
    for r in rows:
        if "endpoint_error" in r:
            out.append(f"{r['method']} {r['ratio']:g}: could not be served ({r['endpoint_error']})")
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, dense = report["rows"], report["rows"][0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in report["methods"]:
        points = sorted((r["effective_ratio"], r["ppl"]) for r in rows[1:] if r["method"] == method)
        xs, ys = [0.0] + [p[0] for p in points], [dense["ppl"]] + [p[1] for p in points]
        ax.plot(xs, ys, marker="o", linewidth=2.5 if method == "heapr" else 1.2, label=method, zorder=3 if method == "heapr" else 2)
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("share of routed-expert parameters removed (effective ratio)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{Path(report['model']).name}: perplexity vs pruning ratio")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from heapr_serve.checkpoint.format import count_source_params, dense_expert_width
    from heapr_serve.quantize.after_pruning import QuantizeRun
    from heapr_serve.prune.options import PruneOptions
    from heapr_serve.prune.to_folder import RetuneRun, prune_to_folder
    from heapr_serve.errors import HeaprError
    from heapr_serve.eval.perplexity import eval_tokens, eval_windows
    from heapr_serve.prune.methods import METHODS, get_method
    from heapr_serve.models import load_tokenizer, resolve_model
    from heapr_serve.progress import console

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL), help="dense MoE model folder (default: the bundled example)")
    parser.add_argument("--ratios", default="0.25,0.5", help="comma-separated ratios (default 0.25,0.5)")
    parser.add_argument("--methods", default="all", help=f"comma-separated, or all: {','.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for quality_table.md/.json and quality_ppl.png")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/heapr-quality"), help="pruned checkpoints and server logs")
    parser.add_argument("--tasks", default="heapr_local", help="lm-eval tasks ('' to skip)")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval documents per task")
    parser.add_argument("--backend", choices=["endpoint", "transformers"], default="endpoint", help="where lm-eval runs")
    parser.add_argument("--endpoint-for", default="", help="with --backend transformers: also serve these checkpoints with vLLM "
                        "(comma-separated: dense and/or method names, or all) for endpoint perplexity and lm-eval")
    parser.add_argument("--align", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256, help="perplexity window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--render", type=Path, default=None, help="only rebuild the table, claims and plot from this quality_table.json")
    args = parser.parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        write_outputs(report, args.out)
        return

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        methods = [x for m in methods for x in (list(METHODS) if m == "all" else [f"{n}+reconstruct" for n in METHODS] if m == "all+" else [m])]
    except ValueError:
        raise SystemExit(f"error: --ratios {args.ratios!r}: give comma-separated numbers like 0.25,0.5")
    try:
        for m in methods:
            get_method(parse_method(m)[0])
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    except HeaprError as err:
        raise SystemExit(f"error: {err}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    source = resolve_model(args.model)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    stats, batches = calibrate(source, args.nsamples, args.calib_seq_len, 8, args.seed)
    tokens, text_source = eval_tokens(load_tokenizer(source), None)
    report = {"model": str(source), "ratios": ratios, "methods": methods, "align": args.align, "seq_len": args.seq_len,
              "eval_tokens": int(eval_windows(tokens, args.seq_len).numel()), "text": text_source,
              "calibration": stats.metadata["calibration"], "tasks": args.tasks, "lm_eval_backend": args.backend,
              "limit": args.limit, "rows": []}
    checkpoints = [("dense", None, source)]
    for method in methods:
        for ratio in ratios:
            folder = args.workdir / f"{method}-{ratio:g}"
            console.print(f"pruning: {method} at {ratio:g}")
            name, stages = parse_method(method)
            retune = None if stages is None else RetuneRun(batches, torch.float32, torch.device("cpu"))
            quantize, align = parse_quantize(method)[1], args.align
            if quantize is not None:
                config = json.loads((source / "config.json").read_text())
                quantize, align = quantize.resolve(source, align, int(config["hidden_size"]), dense_expert_width(config))
                quantize = QuantizeRun(quantize, batches, torch.float32, torch.device("cpu"))
            options = PruneOptions(ratio, name, align=align, seed=args.seed, overwrite=True, **(stages or {}),
                                   quantize=None if quantize is None else quantize.opts)
            prune_to_folder(source, folder, stats, options, retune, quantize)
            checkpoints.append((method, ratio, folder))
    for method, ratio, folder in checkpoints:
        console.print(f"[bold]evaluating {method} {'' if ratio is None else ratio}[/] ({folder})")
        row = {"method": method, "ratio": ratio or 0.0, "folder": str(folder), "params": count_source_params(folder)}
        config = json.loads((folder / "config.json").read_text())
        row["effective_ratio"] = config.get("heapr", {}).get("effective_ratio", 0.0)
        row["zero_width_experts"] = sum(w == 0 for ws in config.get("heapr", {}).get("expert_widths", {}).values() for w in ws)
        serve = args.endpoint_for == "all" or method in [m.strip() for m in args.endpoint_for.split(",")]
        row.update(evaluate_folder(folder, args, tokens, args.port, serve))
        console.print({k: v for k, v in row.items() if k != "folder"})
        report["rows"].append(row)
        (args.out / "quality_table.json").write_text(json.dumps(report, indent=2) + "\n")  # partial results survive
    report["wall_s"] = round(time.perf_counter() - start, 1)
    write_outputs(report, args.out)


def write_outputs(report: dict, out: Path) -> None:
    """quality_table.md (table + checked claims), quality_table.json and quality_ppl.png in `out`."""
    from heapr_serve.progress import console

    out.mkdir(parents=True, exist_ok=True)
    report["claims"] = claims(report)
    table = markdown(report)
    (out / "quality_table.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quality_table.md").write_text(table + "\n" + "\n".join(f"- {c}" for c in report["claims"]) + "\n")
    plot(report, out / "quality_ppl.png")
    console.print(table)
    for c in report["claims"]:
        console.print("- " + c)
    console.print(f"wrote {out / 'quality_table.md'}, {out / 'quality_table.json'}, {out / 'quality_ppl.png'}")


if __name__ == "__main__":
    main()
