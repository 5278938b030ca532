"""`compress --quantize SCHEME [--quant-method gptq|rtn]`: prune, then quantize, in one run.

The pruned checkpoint is written to a scratch folder beside the output, then quantized into the
output by `quantize`'s own writer (heapr_serve.quantize.folder), so both paths write the same bytes
for round-to-nearest and the same checks run. With GPTQ (the default), the calibration batches that
pruning already drew are run once more, layer by layer, through the pruned (and re-fitted or healed)
model (heapr_serve.quantize.gptq_pass): the streamed memory bound holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from heapr_serve.errors import HeaprError
from heapr_serve.families import Family
from heapr_serve.prune.allocation import PruningPlan
from heapr_serve.quantize.folder import DEFAULT_IGNORE, is_linear_weight, plan_tensors, quantize_folder
from heapr_serve.quantize.rtn import alignment_unit
from heapr_serve.quantize.schemes import SCHEMES, scheme_for

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: str
    method: str = "gptq"
    group_size: int | None = None

    def check(self) -> None:
        """A bad scheme, method or group is refused in one line, before any model is read."""
        if self.scheme not in SCHEMES:
            raise HeaprError(f"--quantize {self.scheme!r}: unknown scheme; choose one of {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise HeaprError(f"--quant-method {self.method!r}: use gptq (calibrated, the default) or rtn (round to nearest)")
        try:
            scheme_for(self.scheme).build(self.group_size)
        except HeaprError as err:
            raise HeaprError(str(err).replace("--group-size", "--quant-group-size")) from None

    def resolve(self, source: Path, align: int, hidden: int, dense_width: int) -> tuple["QuantizeOptions", int]:
        """(these options with the group decided, the --align pruning must use). Kept widths are the
        input width of every expert's down projection, so they must hold whole groups: with --align 1
        (the default) the widths are rounded to the group; a group that does not fit is refused."""
        from heapr_serve.checkpoint.format import PER_EXPERT_TENSOR

        spec = scheme_for(self.scheme)
        _, _, shapes = plan_tensors(source, [re.compile(p) for p in DEFAULT_IGNORE])
        dims = {s[1] for n, s in shapes.items() if is_linear_weight(n, s) and not _is_expert_down(PER_EXPERT_TENSOR.match(n))}
        dims |= {hidden, dense_width} | ({align} if align > 1 else set())
        # at least 4 width steps per expert: a group as wide as the expert would make pruning drop whole experts
        group = self.group_size if self.group_size is not None else spec.fitting_group(sorted(dims), at_most=max(8, dense_width // 4))
        unit = alignment_unit(spec.build(group))[1]
        if unit > 1 and align > 1 and align % unit:
            raise HeaprError(f"--quantize {self.scheme}: groups of {unit} along each expert's input need kept widths in multiples of "
                             f"{unit}; pass --align {unit}, or a --quant-group-size that divides --align {align} (-1: per channel)")
        if unit > 1 and dense_width % unit:
            raise HeaprError(f"--quant-group-size {group}: does not divide the experts' width {dense_width}; pass one that does (-1: per channel)")
        return QuantizeOptions(self.scheme, self.method, group), max(align, unit)


def _is_expert_down(m) -> bool:
    return m is not None and m["proj"] in ("down_proj", "w2")


@dataclass
class QuantizeRun:
    """What `compress --quantize` hands the writer: the options, and for GPTQ this run's batches."""

    opts: QuantizeOptions
    batches: list
    dtype: torch.dtype
    device: torch.device
    activations_dir: Path | None = None


def quantize_pruned(pruned: Path, out: Path, overwrite: bool, run: QuantizeRun, source: Path, family: Family,
                    plan: PruningPlan, updates, scratch: Path, progress, carry: tuple[str, ...]) -> dict:
    """Quantize the pruned folder `pruned` into `out`; returns the quantization record."""

    opts = run.opts
    calibrate = None
    if opts.method == "gptq":
        calibrate = gptq_calibration(source, family, plan, run, updates, scratch, progress)
    return quantize_folder(pruned, out, opts.scheme, opts.group_size, [], overwrite, calibrate=calibrate, carry=carry)


def gptq_calibration(source: Path, family: Family, plan: PruningPlan | None, run: QuantizeRun, updates, scratch: Path, progress):
    """`quantize_folder`'s `calibrate`: the GPTQ pass over `source` (pruned by `plan`, with `updates`)."""
    from heapr_serve.checkpoint.source import SourceCheckpoint
    from heapr_serve.quantize.gptq_pass import computed_tensors, gptq_pass

    def calibrate(scheme, fmt, modules):
        if not run.batches:
            raise HeaprError("--quant-method gptq needs calibration batches; use --quant-method rtn")
        layers = progress.add_task(f"GPTQ {run.opts.scheme}", total=SourceCheckpoint(source).num_layers)
        store = gptq_pass(source, family, plan, run.batches, run.dtype, run.device, scratch, scheme, fmt, modules,
                          updates, run.activations_dir, on_layer=lambda _: progress.advance(layers))
        s = store.summary
        return computed_tensors(store, family), (f"GPTQ (damping 1 %, static activation order, blocks of 128; {s['weights']} weights, "
                                                 f"{s['rounded_to_nearest']} without calibration tokens rounded to nearest)")
    return calibrate
