"""From HEAPr scores to per-expert kept neurons.

Atomic experts are ranked globally across MoE layers (HEAPr-G) or inside each layer (`scope="layer"`),
and the lowest are removed. With `align > 1` kept widths must be multiples of `align`: each expert's
neurons are sorted by score and cut into blocks of `align`; blocks are chosen by their summed score,
best first, across every expert in scope, until the target is reached. Because a block's sum never
beats the block before it in the same expert, the chosen blocks are always a prefix: each expert keeps
its most important neurons, widths are aligned, and the total is the target within one block.
With align 1 this is exactly the plain per-neuron ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from heapr_serve.errors import HeaprError


@dataclass
class PruningPlan:
    keep: dict[int, list[torch.Tensor]]  # layer -> per expert, sorted indices of kept neurons
    dense_width: int
    ratio: float
    scope: str
    align: int
    unrouted: dict[int, list[int]]  # layer -> experts that saw no calibration tokens

    @property
    def widths(self) -> dict[int, list[int]]:
        return {layer: [len(k) for k in experts] for layer, experts in self.keep.items()}

    @property
    def total(self) -> int:
        return sum(len(experts) * self.dense_width for experts in self.keep.values())

    @property
    def kept(self) -> int:
        return sum(sum(w) for w in self.widths.values())

    @property
    def effective_ratio(self) -> float:
        return 1.0 - self.kept / self.total

    @property
    def zero_width_experts(self) -> int:
        return sum(w == 0 for ws in self.widths.values() for w in ws)

    def layer_kept_share(self) -> dict[int, float]:
        return {layer: sum(w) / (len(w) * self.dense_width) for layer, w in self.widths.items()}


def _select(scores: dict[int, torch.Tensor], keep_count: int, align: int) -> dict[int, list[torch.Tensor]]:
    """Choose `keep_count` neurons (within one block) from the given layers' [E, I] scores."""
    order, blocks = {}, []  # blocks: (summed score, layer, expert, block index, size)
    for layer, score in scores.items():
        ranked = torch.argsort(score, dim=1, descending=True, stable=True)
        order[layer] = ranked
        sorted_scores = torch.gather(score, 1, ranked)
        width = score.shape[1]
        for start in range(0, width, align):
            sums = sorted_scores[:, start : start + align].sum(1).tolist()
            size = min(align, width - start)
            blocks += [(s, layer, e, start // align, size) for e, s in enumerate(sums)]
    blocks.sort(key=lambda b: (-b[0], b[1], b[2], b[3]))
    taken = {layer: [0] * s.shape[0] for layer, s in scores.items()}
    kept = 0
    for _, layer, expert, _, size in blocks:
        if kept >= keep_count:
            break
        taken[layer][expert] += size
        kept += size
    return {
        layer: [torch.sort(order[layer][e, : taken[layer][e]]).values for e in range(scores[layer].shape[0])]
        for layer in scores
    }


def check_allocation_options(ratio: float, scope: str, align: int) -> None:
    """The checks of --ratio, --scope and --align that every method shares (a millisecond, so commands
    run them before loading anything)."""
    if not 0.0 <= ratio < 1.0:
        raise HeaprError(f"--ratio must be in [0, 1) (got {ratio}); it is the share of routed-expert neurons removed")
    if scope not in ("global", "layer"):
        raise HeaprError(f"--scope must be 'global' or 'layer' (got {scope!r})")
    if align < 1:
        raise HeaprError(f"--align must be a positive integer (got {align})")


def plan_pruning(scores: dict[int, torch.Tensor], ratio: float, scope: str = "global", align: int = 1,
                 keep_unrouted: bool = False) -> PruningPlan:
    """Decide which atomic experts survive. `scores[layer]` is [E, I] with NaN for unrouted experts."""
    check_allocation_options(ratio, scope, align)
    widths = {s.shape[1] for s in scores.values()}
    if len(widths) != 1:
        raise HeaprError(f"MoE layers have different expert widths {sorted(widths)}; heapr-serve expects one dense width")
    dense_width = widths.pop()

    unrouted = {}
    prepared = {}
    for layer, score in scores.items():
        score = score.double()
        nan_rows = torch.isnan(score).all(dim=1)
        unrouted[layer] = torch.nonzero(nan_rows).flatten().tolist()
        # Unrouted experts have no score: least important (the paper's choice), or always kept.
        fill = math.inf if keep_unrouted else -1.0
        prepared[layer] = torch.nan_to_num(score, nan=fill)

    keep = {}
    groups = [prepared] if scope == "global" else [{layer: s} for layer, s in prepared.items()]
    for group in groups:
        total = sum(s.numel() for s in group.values())
        keep.update(_select(group, round(total * (1.0 - ratio)), align))
    return PruningPlan(keep, dense_width, ratio, scope, align, unrouted)
