"""The benchmark's statistics: one arm's figures at one level, and B's over A's.

Percentiles are of what the client saw; a request that timed out counts as a censored sample, so an
arm cannot look faster by timing out its slowest requests.
"""

from __future__ import annotations

import math

from heapr_serve.ab.bench_request import Result


def _pcts(values: list[float], scale: float = 1000.0) -> dict[str, float] | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None

    def q(p: float) -> float:
        k = (len(vals) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return (vals[lo] + (vals[hi] - vals[lo]) * (k - lo)) * scale

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(vals) / len(vals) * scale}


def summarize(results: list[Result], duration: float) -> dict:
    """Per-arm figures. Failures count in `error_rate`; a request that timed out also enters the
    latency percentiles as a censored sample at the moment it was given up (its latency is at least
    that), so an arm cannot look faster by timing out its slowest requests."""
    ok = [r for r in results if r.ok]
    timed_out = [r for r in results if r.timed_out]
    out_tokens = sum(r.output_tokens for r in ok)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "error"] = errors.get(r.error or "error", 0) + 1
    return {
        "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "error_rate": (len(results) - len(ok)) / len(results) if results else None,
        "timeouts": len(timed_out),
        "error_kinds": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "duration_s": duration,
        "ttft_ms": _pcts([r.ttft for r in ok] + [r.ttft if r.ttft is not None else r.e2e for r in timed_out]),
        "tpot_ms": _pcts([r.tpot for r in ok]),
        "itl_ms": _pcts([g for r in ok for g in r.itl]), "e2e_ms": _pcts([r.e2e for r in ok + timed_out]),
        "output_tokens": out_tokens,
        "mean_prompt_tokens": sum(prompts) / len(prompts) if prompts else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else None,
        "requests_per_s": len(ok) / duration if duration > 0 else None,
    }


# ITL's median can sit at ~0 when a loaded server delivers tokens in bursts (vLLM merges outputs a
# slow API-server loop has not sent yet), so its mean (= tokens' average spacing) is compared too.
RATIO_KEYS = [("ttft_ms", "p50"), ("ttft_ms", "p90"), ("ttft_ms", "p99"), ("tpot_ms", "p50"),
              ("tpot_ms", "p90"), ("itl_ms", "p50"), ("itl_ms", "mean"), ("itl_ms", "p99"),
              ("e2e_ms", "p50"),
              ("e2e_ms", "p90"), ("e2e_ms", "p99"), ("output_tokens_per_s", None),
              ("requests_per_s", None)]


def ratios(sa: dict, sb: dict) -> dict[str, float | None]:
    out = {}
    for key, sub in RATIO_KEYS:
        va, vb = sa.get(key), sb.get(key)
        if sub:
            va, vb = (va or {}).get(sub), (vb or {}).get(sub)
        name = f"{key}_{sub}" if sub else key
        out[name] = vb / va if va and vb is not None else None
    ea, eb = sa.get("error_rate"), sb.get("error_rate")
    # B's error rate over A's: 1.0 when neither failed; None (shown as "B only") when only B did
    out["error_rate"] = None if ea is None or eb is None else (1.0 if ea == eb == 0 else eb / ea if ea else None)
    return out
