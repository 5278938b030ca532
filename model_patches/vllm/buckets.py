"""Width buckets: how a layer's heterogeneous widths become a few uniform stacks (design §3).

A layer's experts are grouped by their (per tensor-parallel rank, aligned) width; each bucket is a
uniform stack that the platform's stock kernel runs. Pure Python, no vLLM import, so it is tested and
planned anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass


def rank_share(width: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """Neurons [lo, hi) of an expert of `width` that TP rank `tp_rank` keeps (exact for any width)."""
    return width * tp_rank // tp_size, width * (tp_rank + 1) // tp_size


def _round_up(x: int, align: int) -> int:
    return -(-x // align) * align


@dataclass(frozen=True)
class Bucket:
    """Experts of one layer that run as one uniform stack of `width` (per rank, padded) neurons."""

    width: int
    experts: tuple[int, ...]


def plan_buckets(widths: list[int], tp_size: int, tp_rank: int, align: int) -> list[Bucket]:
    """Group experts by their padded per-rank width, widest first; width-0 experts are in none.

    Zero padding inside a bucket is exact (padded gate/up rows give act(0)*0 = 0 and padded down
    columns multiply zeros), so `align` only trades memory for kernel eligibility.
    """
    by_width: dict[int, list[int]] = {}
    for e, w in enumerate(widths):
        lo, hi = rank_share(w, tp_size, tp_rank)
        if hi > lo:
            by_width.setdefault(_round_up(hi - lo, align), []).append(e)
    return [Bucket(w, tuple(ex)) for w, ex in sorted(by_width.items(), reverse=True)]
