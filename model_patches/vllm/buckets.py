"""Width buckets and slices: how a layer's heterogeneous widths become uniform stacks (design §3).

A layer's experts are grouped by their (per tensor-parallel rank, tile-rounded) width; each bucket is
a uniform stack that the platform's stock kernel runs, one kernel call per non-empty bucket. When the
widths are a few tiles at most, a second layout is cheaper: every expert is cut into `tile`-wide
*slices* (a width-64 expert is two width-32 experts whose outputs add up), all slices of the layer
form one uniform stack, and a token's top-k experts become its top-k' slices: one kernel call per
layer, whatever the widths. `choose_layout` is the cost model between the two. Neither layout pads
beyond rounding each per-rank width up to the tile (so memory never grows past that rounding); a
slice layout fills a batch's empty slots with the token's own slices at weight 0. Pure Python, no vLLM import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def rank_share(width: int, tp_size: int, tp_rank: int, unit: int = 1) -> tuple[int, int]:
    """Neurons [lo, hi) of an expert of `width` that TP rank `tp_rank` keeps (exact for any width).

    The split is in whole blocks of gcd(width, unit) neurons, so a width that is a multiple of the
    kernel tile (`unit`) gives every rank a multiple of it too (96 at TP 2 and tile 32: 64 + 32, not
    48 + 48, which would pad to 64 + 64).
    """
    block = math.gcd(width, unit) if width else 1
    blocks = width // block
    return blocks * tp_rank // tp_size * block, blocks * (tp_rank + 1) // tp_size * block


def _round_up(x: int, align: int) -> int:
    return -(-x // align) * align


@dataclass(frozen=True)
class Bucket:
    """Experts of one layer that run as one uniform stack of `width` (per rank, padded) neurons."""

    width: int
    experts: tuple[int, ...]


@dataclass(frozen=True)
class Slices:
    """Every expert cut into `width`-wide slices: expert e owns slices [start[e], start[e] + count[e])
    of one stack of `size` slices. Empty slots repeat one of the token's own slices at weight 0 (no
    extra memory); `zero` is the slot for a token with no slice at all (the stack's slice 0)."""

    width: int
    start: tuple[int, ...]
    count: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.count)

    @property
    def size(self) -> int:
        return max(1, self.total)  # a layer of width-0 experts still needs one (zero) slice

    zero = 0

    @property
    def max_count(self) -> int:
        return max(self.count, default=0)


def owned_widths(widths: list[int], owned) -> list[int]:
    """The widths one expert-parallel rank builds: its own experts at their full width, every other
    expert at 0, so that it lands in no bucket and has no slice (contributes exactly zero here, as a
    pruned-away expert does; its rank adds it in the all-reduce). Ids stay global."""
    owned = set(owned)
    return [w if e in owned else 0 for e, w in enumerate(widths)]


def rank_widths(widths: list[int], tp_size: int, tp_rank: int, unit: int = 1) -> list[int]:
    return [hi - lo for lo, hi in (rank_share(w, tp_size, tp_rank, unit) for w in widths)]


def plan_buckets(widths: list[int], tp_size: int, tp_rank: int, align: int) -> list[Bucket]:
    """Group experts by their padded per-rank width, widest first; width-0 experts are in none.

    Zero padding inside a bucket is exact (padded gate/up rows give act(0)*0 = 0 and padded down
    columns multiply zeros), so `align` only trades memory for kernel eligibility.
    """
    by_width: dict[int, list[int]] = {}
    for e, w in enumerate(rank_widths(widths, tp_size, tp_rank, align)):
        if w:
            by_width.setdefault(_round_up(w, align), []).append(e)
    return [Bucket(w, tuple(ex)) for w, ex in sorted(by_width.items(), reverse=True)]


def plan_slices(widths: list[int], tp_size: int, tp_rank: int, tile: int) -> Slices:
    counts = [-(-w // tile) for w in rank_widths(widths, tp_size, tp_rank, tile)]
    starts, s = [], 0
    for c in counts:
        starts.append(s)
        s += c
    return Slices(tile, tuple(starts), tuple(counts))


# Cost model constants, measured on vLLM's CPU kernel (tools/bench_moe_layer, 1 thread, AVX-512):
# a kernel call costs ~8 us before any work (three OpenMP regions, routing tables); every extra
# (token, slice) slot costs a copy of the token's row, an fp32 output row and its weighted sum.
CALL_US = 8.0
SLOT_NS_PER_HIDDEN = 2.0
DECODE_TOKENS = (1, 4, 16)


def choose_layout(widths: list[int], tp_size: int, tp_rank: int, tile: int, hidden: int, top_k: int) -> str:
    """'slices' when one call with more, smaller slots beats one call per bucket, else 'buckets'.

    Estimated extra time of each layout over the same weight reads, at decode-sized batches (what a
    server runs most steps): buckets pay a call per bucket that the batch touches, slices pay for the
    extra slots (a token on an expert of c slices takes c slots, up to the layer's largest c).
    """
    buckets = plan_buckets(widths, tp_size, tp_rank, tile)
    slices = plan_slices(widths, tp_size, tp_rank, tile)
    if len(buckets) <= 1 and slices.max_count <= 1:
        return "buckets"
    slot_us = SLOT_NS_PER_HIDDEN * hidden / 1000
    cost = {"buckets": 0.0, "slices": 0.0}
    for T in DECODE_TOKENS:
        pairs = T * top_k
        cost["buckets"] += CALL_US * min(len(buckets), pairs)
        cost["slices"] += CALL_US + slot_us * pairs * (slices.max_count - 1)
    return min(cost, key=lambda k: (cost[k], k != "buckets"))
