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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from heapr_serve.prune.allocation import PruningPlan
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


@dataclass
class RefitDowns:
    """The re-fitted down-projection columns, one safetensors file per layer in a temporary folder (a big
    model's would not fit in memory), read back by the checkpoint writer."""

    folder: Path
    summary: dict = field(default_factory=lambda: {"experts_refit": 0, "error_before": 0.0, "error_after": 0.0})

    def put(self, layer: int, downs: dict[int, torch.Tensor]) -> None:
        if downs:
            save_file({str(e): t.contiguous().cpu() for e, t in downs.items()}, str(self.folder / f"layer-{layer}.safetensors"))

    def get(self, layer: int, expert: int) -> torch.Tensor | None:
        file = self.folder / f"layer-{layer}.safetensors"
        if not file.is_file():
            return None
        with safe_open(file, "pt") as f:
            return f.get_tensor(str(expert)) if str(expert) in f.keys() else None


def reconstruct(source: Path, plan: PruningPlan, batches: list, dtype: torch.dtype, device: torch.device, folder: Path,
                damp: float = DEFAULT_DAMP, inputs: str = "pruned", activations_dir: Path | None = None,
                on_layer=None) -> RefitDowns:
    """Re-fit every pruned expert of `plan` on this rank's `batches`; the results go to `folder`."""
    ranks = distributed.ranks_from_env()
    refit = RefitDowns(Path(folder))
    calibration = StreamedPass(source, dtype, device, activations_dir, on_step=on_layer)

    def visit(layer: int, module, run) -> bool:
        if layer not in plan.keep:
            return False
        experts = module.mlp.experts
        observer = GramObserver()
        run(observer)
        distributed.all_reduce_sums(ranks, {f"gram.{layer}": observer.gram[layer], f"energy.{layer}": observer.energy[layer]}, device)
        gram, energy = observer.gram.pop(layer), observer.energy.pop(layer).tolist()
        downs = {}
        for expert, kept in enumerate(plan.keep[layer]):
            down = experts.down_proj[expert]  # [H, I], the dense columns
            new, before, after = refit_down(down, gram[expert], kept.to(gram.device), damp, energy[expert])
            refit.summary["error_before"] += before
            refit.summary["error_after"] += after
            if new is not None:
                downs[expert] = new.to(down.dtype)
                refit.summary["experts_refit"] += 1
            if inputs == "pruned":  # the layer as the pruned checkpoint will compute it
                column = down.new_zeros(down.shape)
                if len(kept):
                    column[:, kept] = downs[expert] if new is not None else down[:, kept]
                down.copy_(column)
        del gram
        refit.put(layer, downs)
        return inputs == "pruned"

    calibration.forward_by_layer(batches, visit)
    return refit


def temporary_folder(out: Path) -> tempfile.TemporaryDirectory:
    """Beside the output (same disk, which was checked for space), removed whatever happens."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{out.name}.heapr-refit-", dir=out.parent)
