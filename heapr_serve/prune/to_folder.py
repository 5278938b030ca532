"""The stage `compress` and `apply` share: from statistics and `PruneOptions` to the pruned folder.

Plan with the method (heapr_serve.prune.methods), give the kept weights new values if asked (the
least-squares re-fit, heapr_serve.prune.reconstruct; healing, heapr_serve.prune.heal), and stream the
pruned checkpoint, with the statistics (so any method can re-prune it later), into a staging folder
that is renamed into place when complete; with --quantize, write it to scratch beside the output and
quantize it into the output (heapr_serve.quantize.after_pruning).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from heapr_serve.checkpoint.format import (count_source_params, dense_expert_width, num_routed_experts, read_config,
                                           safetensors_files)
from heapr_serve.checkpoint.model_card import write_model_card
from heapr_serve.checkpoint.source import SourceCheckpoint
from heapr_serve.checkpoint.writer import staging_folder, write_pruned_checkpoint
from heapr_serve.errors import HeaprError
from heapr_serve.families import family_for
from heapr_serve.models import load_model
from heapr_serve.progress import progress_bar
from heapr_serve.prune.allocation import PruningPlan
from heapr_serve.prune.distill import distill
from heapr_serve.prune.heal import heal
from heapr_serve.prune.methods import plan_for_method, plan_record
from heapr_serve.prune.options import PruneOptions
from heapr_serve.prune.reconstruct import reconstruct, temporary_folder
from heapr_serve.score.stats import SCORES_FILE, ExpertStats

if TYPE_CHECKING:  # compressed-tensors (~8 s to import on 2 cores) only when quantizing
    from heapr_serve.quantize.after_pruning import QuantizeRun


@dataclass
class RetuneRun:
    """What `--reconstruct` and `--heal` run on: this rank's calibration batches, in `dtype` on
    `device`; healed layers are saved in `heal_folder` as they finish (compress: beside the output, for
    --resume, under `heal_identity`) or in a temporary folder (None)."""

    batches: list
    dtype: torch.dtype
    device: torch.device
    activations_dir: Optional[Path] = None
    heal_folder: Optional[Path] = None
    heal_identity: dict = field(default_factory=dict)


@dataclass
class PruneResult:
    out: Path
    plan: PruningPlan
    source_params: int
    pruned_params: int
    pruned_bytes: int
    method: str = "heapr"
    reconstruct: dict | None = None
    heal: dict | None = None
    quantization: dict | None = None


def check_source(source: Path) -> dict:
    """The dense source's config, once the folder is known to be one heapr-serve can prune."""
    config = read_config(source)
    if "heapr" in config:
        raise HeaprError(f"{source}: is already a pruned checkpoint; compress its dense source, or re-prune with `heapr-serve apply {source} --ratio R`")
    family_for(config)
    SourceCheckpoint(source)  # shards, FP8 quantization_config, layers past num_hidden_layers: checked in a second
    return config


def prune_to_folder(source: Path, out: Path, stats: ExpertStats, options: PruneOptions, retune: RetuneRun | None = None,
                    quantize: QuantizeRun | None = None) -> PruneResult:
    """Plan `options` from `stats`, re-fit or heal the kept weights on `retune`'s batches when the
    options ask for it, and write the pruned checkpoint to `out`; with `quantize` (the run of
    `options.quantize`), write it beside `out` and quantize it into `out`."""
    config = read_config(source)
    family = family_for(config)
    expected = (num_routed_experts(config), dense_expert_width(config))
    for layer, act in stats.act_sq.items():
        if tuple(act.shape) != expected:
            raise HeaprError(f"scores for layer {layer} have shape {list(act.shape)} but {source} has {expected[0]} experts of width {expected[1]}; pass the model the scores were computed on")
    plan = plan_for_method(stats, source, options)
    source_params = count_source_params(source)
    heapr = {
        **plan_record(plan, options),
        "source_architectures": config.get("architectures", [family.architecture]),
        "source_model": stats.metadata.get("source_model", str(source)),
        "calibration": stats.metadata.get("calibration", {}),
        "source_params": source_params,
    }
    files = safetensors_files(source)
    scratch = temporary_folder(out) if options.retunes else contextlib.nullcontext()
    written_to = staging_folder(out, options.overwrite) if quantize is None else _scratch_path(out)
    with scratch as refit_folder, progress_bar() as progress, written_to as folder:
        refit = None
        if options.retunes:
            refit = retune_plan(source, plan, options, retune, refit_folder, progress)
            if options.heal is not None:
                heapr["heal"] = {**options.heal.record(), "reconstruct_start": options.reconstruct,
                                 **({"reconstruct_damp": options.reconstruct_damp} if options.reconstruct else {}), **refit.summary}
            else:
                heapr["reconstruct"] = {"inputs": options.reconstruct_inputs, "damp": options.reconstruct_damp,
                                        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in refit.summary.items()}}
        task = progress.add_task("writing checkpoint", total=len(files))
        written = write_pruned_checkpoint(source, folder, family, plan.keep, heapr, progress=lambda _: progress.advance(task),
                                          drop_mtp=options.drop_mtp, updates=None if refit is None else refit.get)
        heapr["pruned_params"] = written["params"]
        config_file = folder / "config.json"
        saved = json.loads(config_file.read_text())
        saved["heapr"]["pruned_params"] = written["params"]
        config_file.write_text(json.dumps(saved, indent=2) + "\n")
        stats.save(folder / SCORES_FILE)
        write_model_card(folder, saved, plan, source_params, written["params"], out.name)
        quantized = None
        if quantize is not None:
            from heapr_serve.quantize.after_pruning import quantize_pruned

            with _scratch_path(out) as gptq_folder:
                quantized = quantize_pruned(folder, out, options.overwrite, quantize, source, family, plan, None if refit is None else refit.get,
                                            gptq_folder, progress, carry=(SCORES_FILE,))
    return PruneResult(out, plan, source_params, written["params"], written["bytes"], method=options.method, reconstruct=heapr.get("reconstruct"),
                       heal=heapr.get("heal"), quantization=quantized)


@contextlib.contextmanager
def _scratch_path(out: Path):
    with temporary_folder(out) as folder:
        yield Path(folder)


def retune_plan(source: Path, plan: PruningPlan, options: PruneOptions, run: RetuneRun, folder: Path, progress):
    """Run the re-fit of `--reconstruct` or the healing of `--heal` (every rank of a torchrun launch
    calls this with its batches)."""
    if options.heal is not None:
        layers = progress.add_task("healing pruned layers", total=SourceCheckpoint(source).num_layers)
        family = family_for(read_config(source))
        healed = heal(source, family, plan, run.batches, run.dtype, run.device, run.heal_folder or folder, options.heal, run.heal_identity,
                      options.reconstruct_damp if options.reconstruct else None, run.activations_dir, on_layer=lambda _: progress.advance(layers))
        if options.heal.e2e_steps:
            healed.summary["e2e"] = distill(lambda dt, dev: load_model(source, dt, dev), family, plan, healed, run.batches, run.dtype,
                                            run.device, options.heal, SourceCheckpoint(source).dtype)
        return healed
    layers = progress.add_task(f"re-fitting down projections ({options.reconstruct_inputs} inputs)", total=SourceCheckpoint(source).num_layers)
    return reconstruct(source, plan, run.batches, run.dtype, run.device, folder, options.reconstruct_damp, options.reconstruct_inputs,
                       run.activations_dir, on_layer=lambda _: progress.advance(layers))
