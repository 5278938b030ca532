"""`--reconstruct`: re-fit the kept atomic experts' down-projection columns after pruning.

HEAPr's score comes from Optimal Brain Surgeon, which also *updates* the remaining weights to absorb a
removal; the paper skips that step. Here, per routed expert with kept neurons K, the down projection's
kept columns are re-fitted so the expert's output on the calibration tokens routed to it stays as close
as possible (least squares) to the dense expert's:

    D_K <- D C[:, K] (C[K, K] + lambda I)^-1,   C = sum_t a_t a_t^T  (I x I, float64)

with a_t the expert's intermediate activation for token t (padding excluded) and lambda = `damp` x the
mean of diag C[K, K]. The gate and up rows are untouched, so the pruned expert's activations on kept
neurons are the dense ones, and the checkpoint format and the served function are unchanged.

`inputs="pruned"` (default) fits layer by layer on the *pruned, already re-fitted* model's own inputs,
as SparseGPT does: layer l's Gram matrices see what layers < l now produce, so each layer also absorbs
the drift of the layers before it. `inputs="dense"` fits every layer on the dense model's activations.
Both run as one forward-only pass with one decoder layer resident (heapr_serve.score.streamed), so
memory is one layer's weights and one layer's Gram matrices (E x I x I float64), never all layers'.
Under torchrun each rank runs its share of the batches and the Gram matrices are summed across ranks
before every rank solves the same system, so all ranks continue with the same re-fitted layer.
An expert whose re-fit would not lower its calibration error (possible with damping) keeps its columns.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from heapr_serve.prune.allocation import PruningPlan
from heapr_serve.prune.updates import LayerUpdates
from heapr_serve.score import distributed
from heapr_serve.score.observers import ExpertObserver
from heapr_serve.score.streamed import StreamedPass

DEFAULT_DAMP = 1e-3
INPUTS = ("pruned", "dense")


class GramObserver(ExpertObserver):
    """Per routed expert, C = sum over real tokens of a a^T, and the dense output energy sum ||D a||^2
    (float64), forward only."""

    def __init__(self) -> None:
        super().__init__()
        self.gram: dict[int, torch.Tensor] = {}
        self.energy: dict[int, torch.Tensor] = {}

    def allocate(self, layer, experts) -> None:
        num_experts, _, width = experts.down_proj.shape
        self.gram[layer] = torch.zeros(num_experts, width, width, dtype=torch.float64, device=experts.down_proj.device)
        self.energy[layer] = torch.zeros(num_experts, dtype=torch.float64, device=experts.down_proj.device)

    def observe(self, layer, expert, tokens, activation, output, route_weights) -> None:
        a = self.real_rows(tokens, activation.detach().double())
        self.gram[layer][expert].addmm_(a.t(), a)
        self.energy[layer][expert] += self.real_rows(tokens, output.detach().double()).pow(2).sum()


def refit_down(down: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damp: float,
               dense_energy: float | None = None) -> tuple[torch.Tensor | None, float, float]:
    """The re-fitted kept columns [H, K] (float32) of one expert's down projection `down` [H, I], or None
    when nothing changes (all or no neurons kept, no tokens seen, or the fit would not help); with the
    calibration error sum_t ||D a_t - D'_K a_{t,K}||^2 before and after, from the Gram matrix alone
    (`dense_energy` = sum_t ||D a_t||^2 when the caller has it, else tr(D C D^T))."""
    if len(kept) == 0 or len(kept) == down.shape[1]:
        return None, 0.0, 0.0
    ckk = gram[kept][:, kept]
    scale = float(ckk.diagonal().mean())
    if not scale > 0:
        return None, 0.0, 0.0
    d = down.double()
    rhs = gram[kept] @ d.t()  # C[K, :] D^T  [K, H]
    solved = torch.linalg.solve(ckk + damp * scale * torch.eye(len(kept), dtype=ckk.dtype, device=ckk.device), rhs).t()

    def error(x: torch.Tensor) -> float:  # ||D a||^2 - 2 <X a_K, D a> + ||X a_K||^2, summed over tokens
        return float(dense_energy - 2 * (x * rhs.t()).sum() + ((x @ ckk) * x).sum())

    if dense_energy is None:
        dense_energy = float(((d @ gram) * d).sum())
    before, after = error(d[:, kept]), error(solved)
    if not after < before:
        return None, before, before
    return solved.float(), before, after


class _RoutedActivations(GramObserver):
    """The Gram sums, and per batch each expert's tokens, router weights and activations, so that a
    re-fitted layer's stored outputs can be corrected by the change of its routed experts' output
    alone (sum over routed tokens of w (D~ - D) a) instead of running the whole layer again. Stops
    recording past `budget` bytes (the caller then recomputes)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget, self.bytes = budget, 0
        self.seen: list[list[tuple]] | None = []

    def begin_batch(self, attention_mask) -> None:
        super().begin_batch(attention_mask)
        if self.seen is not None:
            self.seen.append([])

    def observe(self, layer, expert, tokens, activation, output, route_weights) -> None:
        super().observe(layer, expert, tokens, activation, output, route_weights)
        if self.seen is not None:
            self.bytes += activation.numel() * activation.element_size()
            if self.bytes > self.budget:
                self.seen = None
            else:
                self.seen[-1].append((expert, tokens, route_weights.detach(), activation.detach()))


def _corrected(old: torch.Tensor, seen: list[tuple], change: dict[int, torch.Tensor]) -> torch.Tensor:
    """A layer's output after its routed experts' down projections changed by `change[e]` [H, I]."""
    delta = torch.zeros(old.shape[0] * old.shape[1], old.shape[-1], dtype=torch.float32, device=old.device)
    for expert, tokens, weights, activation in seen:
        if expert in change:
            delta.index_add_(0, tokens, (activation.float() @ change[expert].t()) * weights.float().unsqueeze(-1))
    return old.float() + delta.view(old.shape)


ACTIVATION_BUDGET = 2 * 1024**3  # bytes of routed activations kept per layer for the output correction


def reconstruct(source: Path, plan: PruningPlan, batches: list, dtype: torch.dtype, device: torch.device, folder: Path,
                damp: float = DEFAULT_DAMP, inputs: str = "pruned", activations_dir: Path | None = None,
                on_layer=None) -> LayerUpdates:
    """Re-fit every pruned expert of `plan` on this rank's `batches`; the results go to `folder`."""
    ranks = distributed.ranks_from_env()
    refit = LayerUpdates(Path(folder), {"experts_refit": 0, "error_before": 0.0, "error_after": 0.0, "layers_recomputed": 0})
    calibration = StreamedPass(source, dtype, device, activations_dir, on_step=on_layer)

    def visit(layer: int, module, v) -> bool:
        if layer not in plan.keep:
            return False
        experts = module.mlp.experts
        observer = _RoutedActivations(ACTIVATION_BUDGET) if inputs == "pruned" else GramObserver()
        v.run(observer)
        distributed.all_reduce_sums(ranks, {f"gram.{layer}": observer.gram[layer], f"energy.{layer}": observer.energy[layer]}, device)
        gram, energy = observer.gram.pop(layer), observer.energy.pop(layer).tolist()
        downs, change = {}, {}
        for expert, kept in enumerate(plan.keep[layer]):
            down = experts.down_proj[expert]  # [H, I], the dense columns
            new, before, after = refit_down(down, gram[expert], kept.to(gram.device), damp, energy[expert])
            refit.summary["error_before"] += before
            refit.summary["error_after"] += after
            if new is not None:
                downs[expert] = new.to(down.dtype)
                refit.summary["experts_refit"] += 1
            if inputs == "pruned" and len(kept) < down.shape[1]:  # the layer as the pruned checkpoint computes it
                column = down.new_zeros(down.shape)
                if len(kept):
                    column[:, kept] = downs[expert] if new is not None else down[:, kept]
                change[expert] = column.float() - down.float()
                down.copy_(column)
        del gram
        refit.put(layer, {f"{e}.down": t for e, t in downs.items()})
        if inputs == "dense" or not change:
            return False
        recompute = not _correct_outputs(v, observer.seen, change)
        refit.summary["layers_recomputed"] += recompute
        return recompute

    calibration.forward_by_layer(batches, visit)
    return refit


def _correct_outputs(v, seen, change) -> bool:
    """Correct every stored output of the re-fitted layer by its routed experts' change; checked on the
    first batch against running the layer again (which catches a block that does not add its routed
    experts' output linearly to the residual). False: the caller must recompute every output."""
    if seen is None:
        return False
    for b in range(v.batches):
        old = v.output(b)
        corrected = _corrected(old, seen[b], change)
        if b == 0:
            exact = v.recompute(0).float()
            moved = (exact - old.float()).norm()
            if (corrected - exact).norm() > CORRECTION_TOLERANCE * max(float(moved), 1e-30):
                return False
            corrected = exact
        v.set_output(b, corrected.to(old.dtype))
        seen[b] = None  # free as we go
    return True


CORRECTION_TOLERANCE = 0.05  # of the change itself; float32 rounding is ~1e-4 of it, a structural mismatch ~1


def temporary_folder(out: Path) -> tempfile.TemporaryDirectory:
    """Beside the output (same disk, which was checked for space), removed whatever happens."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{out.name}.heapr-refit-", dir=out.parent)
