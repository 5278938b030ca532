"""`compress --quantize SCHEME [--quant-method gptq|rtn]`: prune, then quantize, in one run.

The pruned checkpoint is written to a scratch folder beside the output, then quantized into the
output by `quantize`'s own writer (heapr_serve.quantize.folder), so both paths write the same bytes
for round-to-nearest and the same checks run. With GPTQ (the default), the calibration batches that
pruning already drew are run once more, layer by layer, through the pruned (and re-fitted or healed)
model (heapr_serve.quantize.gptq_pass): the streamed memory bound holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from heapr_serve.errors import HeaprError
from heapr_serve.families import Family
from heapr_serve.prune.allocation import PruningPlan
from heapr_serve.quantize.folder import quantize_folder
from heapr_serve.quantize.options import QuantizeOptions


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
