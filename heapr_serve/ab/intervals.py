"""Confidence intervals for the B/A ratios `bench` reports, so a ratio says whether it is more than noise.

Both arms get the same prompts in the same blocks (ABBA order, A's block k next in time to B's), so
the intervals are paired. With two or more blocks, each block pair gives one log ratio of every
statistic, and the interval is Student's t over those pairs: the noise that matters (load drifting
between blocks, requests of one block sharing a moment) is what differs from block to block, and a
bootstrap over the requests of a few blocks would be far too sure of itself. With one block
(`--schedule concurrent`), a paired bootstrap over the prompts. Latencies follow `bench.summarize`
(timed-out requests are censored samples at the moment they were given up); throughput is tokens
(or requests) over a block's duration; the error rate is failures over requests. A p90 / p99 gets an
interval only with enough samples beyond it. An interval that holds 1.0 means no difference was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
DRAWS = 1000


@dataclass
class Block:
    """One arm's measured block: the results of its prompts, in prompt order, and its wall time."""

    results: list  # bench.Result
    duration: float


class _Arrays:
    """One block's per-request values as arrays (NaN where a request has none), drawn from quickly."""

    def __init__(self, block: Block) -> None:
        rs = block.results
        nan = float("nan")
        self.duration = block.duration
        self.ok = np.array([r.ok for r in rs], dtype=bool)
        censored = [r.timed_out for r in rs]
        self.ttft = np.array([(r.ttft if r.ttft is not None else (r.e2e if t else nan)) if (r.ok or t) else nan
                              for r, t in zip(rs, censored)], dtype=float)
        self.e2e = np.array([r.e2e if (r.ok or t) else nan for r, t in zip(rs, censored)], dtype=float)
        self.tpot = np.array([r.tpot if r.ok and r.tpot is not None else nan for r in rs], dtype=float)
        self.tokens = np.array([r.output_tokens if r.ok else 0 for r in rs], dtype=float)
        self.itl = [np.asarray(r.itl if r.ok else [], dtype=float) for r in rs]


def _stat(values: np.ndarray, sub: str) -> float:
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan")
    if sub == "mean":
        return float(values.mean())
    return float(np.percentile(values, {"p50": 50, "p90": 90, "p99": 99}[sub]))


def _statistics(drawn: list[tuple[_Arrays, np.ndarray]], keys) -> dict[str, float]:
    """Every statistic of the requests `drawn` ((block, row indices) pairs) of one arm."""
    cat = {field: np.concatenate([getattr(blk, field)[rows] for blk, rows in drawn])
           for field in ("ok", "ttft", "e2e", "tpot", "tokens")}
    itl = np.concatenate([blk.itl[i] for blk, rows in drawn for i in rows] or [np.zeros(0)])
    duration = sum(blk.duration for blk, _ in drawn)
    out = {}
    for key, sub in keys:
        name = f"{key}_{sub}" if sub else key
        if key == "output_tokens_per_s":
            out[name] = cat["tokens"].sum() / duration if duration > 0 else float("nan")
        elif key == "requests_per_s":
            out[name] = cat["ok"].sum() / duration if duration > 0 else float("nan")
        else:
            values = itl if key == "itl_ms" else cat[key.removesuffix("_ms")]
            out[name] = _stat(values, sub)
    out["error_rate"] = float((~cat["ok"]).mean()) if cat["ok"].size else float("nan")
    return out


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (numerically: bisection on the integrated density; no scipy needed)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        density = np.exp(log_c - (df + 1) / 2 * np.log1p(grid * grid / df))
        return 0.5 + float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(grid)))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def ratio_intervals(a: list[Block], b: list[Block], keys, draws: int = DRAWS, level: float = LEVEL,
                    seed: int = 0) -> dict[str, tuple[float, float] | None]:
    """{ratio name: (low, high)} of B's statistic over A's, or None where it cannot be had (a statistic
    with no samples, a tail quantile with too few beyond it, an error rate with none on A's side)."""
    if len(a) != len(b) or not a:
        return {}
    arr_a, arr_b = [_Arrays(x) for x in a], [_Arrays(x) for x in b]
    if len(a) >= 2:
        return _paired_blocks(arr_a, arr_b, keys, level)
    rng = np.random.default_rng(seed)
    names = [f"{k}_{s}" if s else k for k, s in keys] + ["error_rate"]
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(draws):
        drawn_a, drawn_b = [], []
        for k in rng.integers(0, len(a), len(a)):
            n = min(len(arr_a[k].ok), len(arr_b[k].ok))
            rows = rng.integers(0, n, n)
            drawn_a.append((arr_a[k], rows))
            drawn_b.append((arr_b[k], rows))
        sa, sb = _statistics(drawn_a, keys), _statistics(drawn_b, keys)
        for n in names:
            va, vb = sa[n], sb[n]
            if n == "error_rate" and va == vb == 0:
                samples[n].append(1.0)
            elif va and np.isfinite(va) and np.isfinite(vb):
                samples[n].append(vb / va)
    tail = (1 - level) / 2 * 100
    out: dict[str, tuple[float, float] | None] = {}
    for n, values in samples.items():
        if len(values) < draws * 0.9 or not _enough_tail(n, arr_a, arr_b):
            out[n] = None  # undefined in too many draws, or a quantile with too few samples beyond it
            continue
        lo, hi = np.percentile(values, [tail, 100 - tail])
        out[n] = (float(lo), float(hi))
    return out


def _paired_blocks(arr_a: list[_Arrays], arr_b: list[_Arrays], keys, level: float) -> dict[str, tuple[float, float] | None]:
    """Student's t interval of the mean log ratio over block pairs, back on the ratio scale; `level`
    holds for all of a level's ratios together (Bonferroni), so that reading every one of them at
    once is still wrong at most 5% of the time."""
    stats = [(_statistics([(x, np.arange(len(x.ok)))], keys), _statistics([(y, np.arange(len(y.ok)))], keys))
             for x, y in zip(arr_a, arr_b)]
    out: dict[str, tuple[float, float] | None] = {}
    for name in stats[0][0]:
        if not _enough_tail(name, arr_a, arr_b):
            out[name] = None
            continue
        pairs = [(sa[name], sb[name]) for sa, sb in stats]
        if name == "error_rate" and all(va == vb == 0 for va, vb in pairs):
            out[name] = (1.0, 1.0)
            continue
        logs = [np.log(vb / va) for va, vb in pairs if va and vb and np.isfinite(va) and np.isfinite(vb)]
        if len(logs) < max(2, len(pairs) - 1):
            out[name] = None
            continue
        t = t_quantile(1 - (1 - level) / 2 / len(stats[0][0]), len(logs) - 1)  # Bonferroni over the ratios
        mean, half = float(np.mean(logs)), t * float(np.std(logs, ddof=1)) / np.sqrt(len(logs))
        out[name] = (float(np.exp(mean - half)), float(np.exp(mean + half)))
    return out


MIN_BEYOND = 10  # samples beyond a quantile for the bootstrap to say how uncertain it is


def _enough_tail(name: str, arr_a: list[_Arrays], arr_b: list[_Arrays]) -> bool:
    """A bootstrap interval of the p90 / p99 of a few dozen samples is wrong (resampling cannot show
    a tail it never saw), so a quantile gets one only with MIN_BEYOND samples beyond it on both arms."""
    for q, suffix in ((0.9, "_p90"), (0.99, "_p99")):
        if name.endswith(suffix):
            field = name.removesuffix(suffix).removesuffix("_ms")
            for arms in (arr_a, arr_b):
                if field == "itl":
                    n = sum(len(x) for blk in arms for x in blk.itl)
                else:
                    n = sum(int(np.isfinite(getattr(blk, field)).sum()) for blk in arms)
                if n * (1 - q) < MIN_BEYOND:
                    return False
    return True


def verdict(ratio: float | None, interval: tuple[float, float] | None, lower_is_better: bool) -> str:
    """One line's reading of a ratio and its interval."""
    if ratio is None or interval is None:
        return "(no interval: too few samples)" if ratio is not None else ""
    lo, hi = interval
    if lo <= 1.0 <= hi:
        return "no difference measured"
    better = (hi < 1.0) == lower_is_better
    return "B better" if better else "B worse"
