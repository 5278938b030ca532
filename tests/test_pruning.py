"""Allocation of kept neurons: exact ratio, alignment, scope, unrouted experts."""

import pytest
import torch

from heapr_serve.errors import HeaprError
from heapr_serve.prune.allocation import plan_pruning


def _scores(seed=0, layers=(0, 3), experts=8, width=96):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.rand(experts, width, generator=g) * (layer + 1) for layer in layers}


def test_global_ranking_removes_exactly_the_lowest():
    scores = _scores()
    plan = plan_pruning(scores, 0.25)
    assert plan.kept == round(0.75 * plan.total)
    assert plan.effective_ratio == pytest.approx(0.25, abs=1e-9)
    kept_min = min(float(scores[l][e, k].min()) for l in scores for e, k in enumerate(plan.keep[l]) if len(k))
    removed_max = max(
        float(scores[l][e][torch.tensor([i for i in range(96) if i not in set(k.tolist())], dtype=torch.long)].max())
        for l in scores for e, k in enumerate(plan.keep[l]) if len(k) < 96
    )
    assert kept_min >= removed_max
    # the later layer has larger scores: global ranking prunes the earlier one harder
    share = plan.layer_kept_share()
    assert share[0] < share[3]


def test_layer_scope_keeps_the_same_share_everywhere():
    plan = plan_pruning(_scores(), 0.5, scope="layer")
    assert all(s == pytest.approx(0.5) for s in plan.layer_kept_share().values())


@pytest.mark.parametrize("align", [16, 32])
def test_alignment_rounds_widths_and_stays_within_one_block(align):
    scores = _scores(seed=3, width=100)  # 100 is not a multiple of the alignment
    plan = plan_pruning(scores, 0.3, align=align)
    for widths in plan.widths.values():
        assert all(w % align == 0 or w == 100 for w in widths)
    target = round(0.7 * plan.total)
    assert abs(plan.kept - target) < align
    # inside every expert the kept neurons are the best-scored ones
    for layer, experts in plan.keep.items():
        for e, kept in enumerate(experts):
            if 0 < len(kept) < 100:
                dropped = torch.ones(100, dtype=torch.bool)
                dropped[kept] = False
                assert scores[layer][e, kept].min() >= scores[layer][e, dropped].max()


def test_unrouted_experts_go_first_or_are_kept():
    scores = _scores()
    scores[0][5] = float("nan")
    plan = plan_pruning(scores, 0.2)
    assert plan.unrouted == {0: [5], 3: []}
    assert plan.widths[0][5] == 0 and plan.zero_width_experts >= 1
    kept = plan_pruning(scores, 0.2, keep_unrouted=True)
    assert kept.widths[0][5] == 96


@pytest.mark.parametrize("kwargs", [dict(ratio=1.0), dict(ratio=-0.1), dict(ratio=0.2, scope="expert"), dict(ratio=0.2, align=0)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(HeaprError):
        plan_pruning(_scores(), **kwargs)
