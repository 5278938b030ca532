"""Pruning methods: HEAPr and the baselines it is measured against, in one registry.

A method is two choices, kept apart so that each baseline isolates one of HEAPr's ingredients:

- a *score*: how important each atomic expert (neuron) is, [E, I] per MoE layer, or each whole
  expert, [E] per layer;
- an *allocation*: how many neurons each expert keeps, given the scores and the ratio.

| method      | score                                              | allocation                          |
|-------------|----------------------------------------------------|-------------------------------------|
| heapr       | mean a_k^2 * mean (dL/da_k)^2 (second order)       | global ranking (or --scope layer)   |
| fisher      | sum_t (a_{t,k} * dL/da_{t,k})^2 (exact emp. Fisher) | global ranking (or --scope layer)   |
| uniform     | HEAPr's score                                      | every expert keeps the same width   |
| activation  | mean a_k^2 * ||d_k||^2 (no gradients)              | global ranking                      |
| magnitude   | ||g_k|| * ||u_k|| * ||d_k|| (weights only)         | global ranking                      |
| random      | uniform random (seeded)                            | global ranking                      |
| reap        | mean over routed tokens of w * ||y|| (REAP)        | drop round(r*E) experts per layer   |
| frequency   | tokens routed to the expert                        | drop round(r*E) experts per layer   |

(g_k, u_k: row k of the gate and up projections; d_k: column k of the down projection; a_k the
neuron's activation; y the expert output before the router weight w.)

Every method returns a `PruningPlan`, so every method writes the same checkpoint format, loads and
serves the same way. One calibration pass (heapr_serve.score, `MethodStatsObserver`) collects what all of them need,
and the statistics file saved beside any output lets `apply --method M` re-prune with any method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import safe_open

from heapr_serve.checkpoint.expert_tensors import expert_parts, expert_tensor
from heapr_serve.checkpoint.format import read_config, safetensors_files
from heapr_serve.checkpoint.source import SourceCheckpoint
from heapr_serve.errors import HeaprError
from heapr_serve.families import family_for
from heapr_serve.prune.allocation import PruningPlan, plan_pruning
from heapr_serve.score.stats import REAP_KEY, ExpertStats

if TYPE_CHECKING:  # the options check the method against this registry, so they import it, not the other way
    from heapr_serve.prune.options import PruneOptions

# --------------------------------------------------------------------------------------------------
# Scores


@dataclass
class ScoreInputs:
    """What a score may look at: the calibration statistics, the dense source (for weights), a seed."""

    stats: ExpertStats
    source: Path
    seed: int = 0
    _norms: dict | None = field(default=None, repr=False)

    def weight_norms(self) -> dict[int, dict[str, torch.Tensor]]:
        """layer -> {"gate", "up", "down"}: [E, I] L2 norms of each neuron's row / column, read once."""
        if self._norms is None:
            self._norms = expert_weight_norms(self.source, set(self.stats.act_sq))
        return self._norms


def expert_weight_norms(source: Path, layers: set[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Per-neuron weight norms of every routed expert, streamed tensor by tensor from the safetensors."""
    family = family_for(read_config(source))
    per_expert: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    norms: dict[int, dict[str, torch.Tensor]] = {}
    src = SourceCheckpoint(source)  # FP8 weights and MXFP4 stacks are read dequantised
    files = safetensors_files(source)
    for file in sorted(set(files.values())):
        with safe_open(Path(source) / file, "pt") as f:
            for disk_name in f.keys():
                name = src.read_name(disk_name)  # an MXFP4 stack by its blocks' stack name; scales skipped
                found = None if name is None else expert_tensor(family, name)
                if found is None or found.layer not in layers:
                    continue
                for part, w in expert_parts(family, found, src.get(f, disk_name).float()).items():
                    norm = w.norm(dim=-2) if part == "down" else w.norm(dim=-1)  # over each neuron's column / row
                    if found.expert is None:
                        norms.setdefault(found.layer, {})[part] = norm
                    else:
                        per_expert.setdefault(found.layer, {}).setdefault(part, {})[found.expert] = norm
    for layer, projs in per_expert.items():
        norms[layer] = {proj: torch.stack([by_expert[e] for e in sorted(by_expert)]) for proj, by_expert in projs.items()}
    missing = sorted(layers - {layer for layer, n in norms.items() if len(n) == 3})
    if missing:
        raise HeaprError(f"{source}: found no routed-expert weights for MoE layers {missing}; pass the dense source model the scores were computed on")
    return norms


def _mean_act_sq(stats: ExpertStats, layer: int) -> torch.Tensor:
    n = stats.tokens[layer].double().unsqueeze(-1)
    mean = stats.act_sq[layer].double() / n
    return torch.where(n > 0, mean, torch.full_like(mean, float("nan")))


def heapr_score(inputs: ScoreInputs) -> dict[int, torch.Tensor]:
    """HEAPr: mean a^2 * mean (dL/da)^2 (= mean a^2 * d^T Gbar d, design §1)."""
    return inputs.stats.scores()


def fisher_score(inputs: ScoreInputs) -> dict[int, torch.Tensor]:
    """The exact empirical Fisher of scaling atomic expert k's output by alpha (OBS's quantity for
    alpha 1 -> 0): sum over real tokens of (a_k * dL/da_k)^2. A sum, not a mean: the loss is one fixed
    normalisation for every token, so an expert that sees more tokens costs more to prune. NaN for
    experts that received no tokens (as HEAPr)."""
    if not inputs.stats.fisher:
        raise HeaprError("--method fisher: the scores file has no Fisher statistics (written by an older heapr-serve); re-run `heapr-serve compress` to recalibrate")
    out = {}
    for layer, fisher in inputs.stats.fisher.items():
        routed = inputs.stats.tokens[layer].unsqueeze(-1) > 0
        out[layer] = torch.where(routed, fisher.double(), torch.full_like(fisher, float("nan"), dtype=torch.float64))
    return out


def activation_score(inputs: ScoreInputs) -> dict[int, torch.Tensor]:
    """First-order output energy, no gradients: E[a_k^2] * ||d_k||^2 = E||a_k d_k||^2."""
    norms = inputs.weight_norms()
    return {layer: _mean_act_sq(inputs.stats, layer) * norms[layer]["down"].double() ** 2 for layer in inputs.stats.act_sq}


def magnitude_score(inputs: ScoreInputs) -> dict[int, torch.Tensor]:
    """Weights only: ||g_k|| * ||u_k|| * ||d_k||, the scale of the neuron's path through the expert."""
    norms = inputs.weight_norms()
    return {layer: (n["gate"] * n["up"] * n["down"]).double() for layer, n in sorted(norms.items())}


def random_score(inputs: ScoreInputs) -> dict[int, torch.Tensor]:
    """Uniform random, seeded (layers in order), so a run is reproducible."""
    generator = torch.Generator().manual_seed(inputs.seed)
    return {layer: torch.rand(tuple(act.shape), generator=generator, dtype=torch.float64) for layer, act in sorted(inputs.stats.act_sq.items())}


def reap_score(inputs: ScoreInputs) -> dict[int, torch.Tensor]:
    """REAP (router-weighted expert activation pruning): mean over the expert's routed tokens of
    w * ||y||_2; [E] per layer, NaN for experts that received no tokens."""
    recorded = inputs.stats.metadata.get(REAP_KEY)
    if not recorded:
        raise HeaprError("--method reap: the scores file has no REAP statistics (written by an older heapr-serve); re-run `heapr-serve compress` to recalibrate")
    out = {}
    for layer, tokens in inputs.stats.tokens.items():
        n = tokens.double()
        total = torch.tensor(recorded[str(layer)], dtype=torch.float64)
        out[layer] = torch.where(n > 0, total / n.clamp(min=1), torch.full_like(n, float("nan")))
    return out


def frequency_score(inputs: ScoreInputs) -> dict[int, torch.Tensor]:
    """How many calibration tokens the router sent to each expert; [E] per layer (NaN when none)."""
    return {layer: torch.where(t > 0, t.double(), torch.full_like(t, float("nan"), dtype=torch.float64)) for layer, t in inputs.stats.tokens.items()}


# --------------------------------------------------------------------------------------------------
# Allocations: scores -> PruningPlan


@dataclass(frozen=True)
class Target:
    """What every allocation is asked for: the ratio and the user's options."""

    ratio: float
    scope: str
    align: int
    keep_unrouted: bool
    unrouted: dict[int, list[int]]  # layer -> experts that received no calibration tokens
    dense_width: int


def global_allocation(scores, t: Target) -> PruningPlan:
    """Rank atomic experts across all MoE layers (or per layer with scope 'layer'), drop the lowest."""
    if t.keep_unrouted:  # scores from weights alone (magnitude, random) have no NaN rows to mark them
        scores = {layer: s.double().index_fill(0, torch.tensor(t.unrouted[layer], dtype=torch.long), float("nan")) for layer, s in scores.items()}
    plan = plan_pruning(scores, t.ratio, t.scope, t.align, t.keep_unrouted)
    plan.unrouted = t.unrouted  # by routing, whatever the score (magnitude and random score every expert)
    return plan


def _fill(score: torch.Tensor, keep_unrouted: bool) -> torch.Tensor:
    """Experts without a score are least important (as in the paper), or always kept."""
    return torch.nan_to_num(score.double(), nan=math.inf if keep_unrouted else -math.inf)


def uniform_allocation(scores, t: Target) -> PruningPlan:
    """Every expert keeps the same width (1 - ratio) * I rounded to `align`; which neurons survive is
    still decided by the score. Isolates the value of HEAPr's uneven, global allocation."""
    width = min(t.dense_width, max(0, round((1.0 - t.ratio) * t.dense_width / t.align) * t.align))
    keep = {}
    for layer, score in scores.items():
        ranked = torch.argsort(_fill(score, False), dim=1, descending=True, stable=True)
        keep[layer] = [
            torch.arange(t.dense_width) if t.keep_unrouted and e in t.unrouted[layer] else torch.sort(ranked[e, :width]).values
            for e in range(score.shape[0])
        ]
    return PruningPlan(keep, t.dense_width, t.ratio, "uniform", t.align, t.unrouted)


def expert_allocation(scores, t: Target) -> PruningPlan:
    """Remove round(ratio * E) whole experts in every layer (lowest expert score), as REAP does; the
    rest keep their full width. The effective ratio is the share of expert parameters removed."""
    keep = {}
    for layer, score in scores.items():
        experts = score.shape[0]
        drop = set(torch.argsort(_fill(score, t.keep_unrouted), stable=True)[: round(t.ratio * experts)].tolist())
        keep[layer] = [torch.zeros(0, dtype=torch.long) if e in drop else torch.arange(t.dense_width) for e in range(experts)]
    return PruningPlan(keep, t.dense_width, t.ratio, "expert", 1, t.unrouted)


# --------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    score: Callable[[ScoreInputs], dict[int, torch.Tensor]]  # [E, I] neuron or [E] expert scores
    allocate: Callable[[dict[int, torch.Tensor], Target], PruningPlan]


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("heapr", "HEAPr: second-order (Fisher) atomic-expert score, global ranking", heapr_score, global_allocation),
        Method("fisher", "exact empirical Fisher sum (a*dL/da)^2 per atomic expert, global ranking", fisher_score, global_allocation),
        Method("uniform", "HEAPr score, but every expert keeps the same width", heapr_score, uniform_allocation),
        Method("activation", "activation-only E[a^2]*||d||^2, no gradients, global ranking", activation_score, global_allocation),
        Method("magnitude", "weight magnitude ||g||*||u||*||d||, global ranking", magnitude_score, global_allocation),
        Method("random", "random neurons (seeded), global ranking", random_score, global_allocation),
        Method("reap", "REAP-style expert pruning: router-weighted output norm, whole experts", reap_score, expert_allocation),
        Method("frequency", "expert pruning by routing frequency, whole experts", frequency_score, expert_allocation),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise HeaprError(f"--method {name!r}: unknown; use one of {', '.join(METHODS)}")
    return METHODS[name]


def plan_for_method(stats: ExpertStats, source: Path, options: PruneOptions) -> PruningPlan:
    """The pruning plan of `options.method` at `options.ratio`, from one set of calibration statistics."""
    m = get_method(options.method)
    unrouted = {layer: torch.nonzero(t == 0).flatten().tolist() for layer, t in stats.tokens.items()}
    dense_width = next(iter(stats.act_sq.values())).shape[1]
    target = Target(options.ratio, options.scope, options.align, options.keep_unrouted, unrouted, dense_width)
    return m.allocate(m.score(ScoreInputs(stats, Path(source), options.seed)), target)


def plan_record(plan: PruningPlan, options: PruneOptions) -> dict:
    """The `heapr` config section's record of a plan (docs/checkpoint_format.md), whoever pruned."""
    return {
        "method": options.method,
        "method_summary": get_method(options.method).summary,
        "dense_width": plan.dense_width,
        "expert_widths": {str(layer): widths for layer, widths in plan.widths.items()},
        "ratio": options.ratio,
        "effective_ratio": round(plan.effective_ratio, 6),
        "align": plan.align,
        "scope": plan.scope,
        **({"seed": options.seed} if options.method == "random" else {}),
        "keep_unrouted": options.keep_unrouted,
        "unrouted_experts": {str(layer): e for layer, e in plan.unrouted.items() if e},
    }
