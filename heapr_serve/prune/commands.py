"""`heapr-serve compress` and `heapr-serve apply`: calibrate, score, prune, write.

The lifecycle is: check every input (so bad input fails in a second, before any model is loaded) ->
calibrate (one forward + one backward pass, collecting HEAPr statistics) -> free the model -> plan
the pruning -> stream the pruned checkpoint into a staging folder -> rename it into place.
`apply` skips calibration by reading the statistics saved beside an earlier output.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.table import Table

from heapr_serve.calibrate.datasets import load_calibration
from heapr_serve.checkpoint.format import (count_source_params, dense_expert_width, num_routed_experts, read_config,
                                           safetensors_files, source_fingerprint)
from heapr_serve.checkpoint.model_card import write_model_card
from heapr_serve.checkpoint.writer import check_output_path, staging_folder, write_pruned_checkpoint
from heapr_serve.errors import HeaprError
from heapr_serve.families import family_for
from heapr_serve.checkpoint.source import SourceCheckpoint
from heapr_serve.models import load_model, load_tokenizer, model_reference, pick_device, pick_dtype, resolve_model
from heapr_serve.progress import console, progress_bar
from heapr_serve.prune.allocation import PruningPlan, check_allocation_options
from heapr_serve.prune.distill import distill
from heapr_serve.prune.heal import DEFAULT_E2E_STEPS, HealOptions, heal
from heapr_serve.prune.methods import METHODS, expert_allocation, get_method, plan_for_method, plan_record, uniform_allocation
from heapr_serve.prune.reconstruct import DEFAULT_DAMP, INPUTS, reconstruct, temporary_folder
from heapr_serve.quantize.after_pruning import QuantizeOptions, QuantizeRun, quantize_pruned
from heapr_serve.score import distributed
from heapr_serve.score.checkpointing import partial_folder
from heapr_serve.score.memory import estimate, room_for
from heapr_serve.score.run import RunOptions, check_fits, finish_run, run_calibration
from heapr_serve.score.stats import SCORES_FILE, ExpertStats


@dataclass
class Reconstruction:
    """What `--reconstruct` and `--heal` need: this rank's calibration batches and how to run and fit
    them. With `heal`, healing runs (starting from the least-squares re-fit when `refit`), its layers
    saved in `heal_folder` as they finish (compress: beside the output, for --resume) or in a
    temporary folder (None)."""

    batches: list
    dtype: torch.dtype
    device: torch.device
    damp: float = DEFAULT_DAMP
    inputs: str = "pruned"
    activations_dir: Optional[Path] = None
    refit: bool = True
    heal: HealOptions | None = None
    heal_folder: Optional[Path] = None
    heal_identity: dict = field(default_factory=dict)


@dataclass
class PruneResult:
    out: Path
    plan: PruningPlan
    source_params: int
    pruned_params: int
    pruned_bytes: int
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "heapr"
    reconstruct: dict | None = None
    heal: dict | None = None
    quantization: dict | None = None


def _check_source(source: Path) -> dict:
    config = read_config(source)
    if "heapr" in config:
        raise HeaprError(f"{source}: is already a pruned checkpoint; compress its dense source, or re-prune with `heapr-serve apply {source} --ratio R`")
    family_for(config)
    SourceCheckpoint(source)  # shards, FP8 quantization_config, layers past num_hidden_layers: checked in a second
    return config


def prune_to_folder(source: Path, out: Path, stats: ExpertStats, ratio: float, scope: str, align: int,
                    keep_unrouted: bool, overwrite: bool, method: str = "heapr", seed: int = 0, drop_mtp: bool = False,
                    reconstruction: Reconstruction | None = None, quantize: QuantizeRun | None = None) -> PruneResult:
    """Plan with `method` (heapr_serve.prune.methods) from `stats`, re-fit the kept down-projection
    columns if asked (heapr_serve.prune.reconstruct), and write the pruned checkpoint (with the
    statistics, so any method can re-prune it later) to `out`; with `quantize`, write it beside `out`
    and quantize it into `out` (heapr_serve.quantize.after_pruning)."""
    config = read_config(source)
    family = family_for(config)
    expected = (num_routed_experts(config), dense_expert_width(config))
    for layer, act in stats.act_sq.items():
        if tuple(act.shape) != expected:
            raise HeaprError(f"scores for layer {layer} have shape {list(act.shape)} but {source} has {expected[0]} experts of width {expected[1]}; pass the model the scores were computed on")
    plan = plan_for_method(method, stats, source, ratio, scope, align, keep_unrouted, seed)
    source_params = count_source_params(source)
    heapr = {
        **plan_record(plan, method, ratio, seed, keep_unrouted),
        "source_architectures": config.get("architectures", [family.architecture]),
        "source_model": stats.metadata.get("source_model", str(source)),
        "calibration": stats.metadata.get("calibration", {}),
        "source_params": source_params,
    }
    files = safetensors_files(source)
    scratch = temporary_folder(out) if reconstruction is not None else contextlib.nullcontext()
    written_to = staging_folder(out, overwrite) if quantize is None else _scratch_path(out)
    with scratch as refit_folder, progress_bar() as progress, written_to as folder:
        refit = None
        if reconstruction is not None:
            refit = refit_plan(source, plan, reconstruction, refit_folder, progress)
            if reconstruction.heal is not None:
                heapr["heal"] = {**reconstruction.heal.record(), "reconstruct_start": reconstruction.refit,
                                 **({"reconstruct_damp": reconstruction.damp} if reconstruction.refit else {}), **refit.summary}
            else:
                heapr["reconstruct"] = {"inputs": reconstruction.inputs, "damp": reconstruction.damp,
                                        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in refit.summary.items()}}
        task = progress.add_task("writing checkpoint", total=len(files))
        written = write_pruned_checkpoint(source, folder, family, plan.keep, heapr, progress=lambda _: progress.advance(task), drop_mtp=drop_mtp,
                                          updates=None if refit is None else refit.get)
        heapr["pruned_params"] = written["params"]
        config_file = folder / "config.json"
        saved = json.loads(config_file.read_text())
        saved["heapr"]["pruned_params"] = written["params"]
        config_file.write_text(json.dumps(saved, indent=2) + "\n")
        stats.save(folder / SCORES_FILE)
        write_model_card(folder, saved, plan, source_params, written["params"], out.name)
        quantized = None
        if quantize is not None:
            with _scratch_path(out) as gptq_folder:
                quantized = quantize_pruned(folder, out, overwrite, quantize, source, family, plan, None if refit is None else refit.get,
                                            gptq_folder, progress, carry=(SCORES_FILE,))
    return PruneResult(out, plan, source_params, written["params"], written["bytes"], method=method, reconstruct=heapr.get("reconstruct"),
                       heal=heapr.get("heal"), quantization=quantized)


@contextlib.contextmanager
def _scratch_path(out: Path):
    with temporary_folder(out) as folder:
        yield Path(folder)


def refit_plan(source: Path, plan: PruningPlan, r: Reconstruction, folder: Path, progress):
    """Run the re-fit of `--reconstruct` or the healing of `--heal` (every rank of a torchrun launch
    calls this with its batches)."""
    if r.heal is not None:
        layers = progress.add_task("healing pruned layers", total=SourceCheckpoint(source).num_layers)
        family = family_for(read_config(source))
        healed = heal(source, family, plan, r.batches, r.dtype, r.device, r.heal_folder or folder, r.heal,
                      r.heal_identity, r.damp if r.refit else None, r.activations_dir, on_layer=lambda _: progress.advance(layers))
        if r.heal.e2e_steps:
            healed.summary["e2e"] = distill(lambda dt, dev: load_model(source, dt, dev), family, plan, healed, r.batches, r.dtype,
                                            r.device, r.heal, SourceCheckpoint(source).dtype)
        return healed
    layers = progress.add_task(f"re-fitting down projections ({r.inputs} inputs)", total=SourceCheckpoint(source).num_layers)
    return reconstruct(source, plan, r.batches, r.dtype, r.device, folder, r.damp, r.inputs, r.activations_dir,
                       on_layer=lambda _: progress.advance(layers))


def _peak_memory_gib(device: torch.device) -> str:
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    text = f"{host:.2f} GiB host"
    if device.type == "cuda":
        text += f", {torch.cuda.max_memory_allocated(device) / 1024**3:.2f} GiB GPU"
    return text


def summary_table(result: PruneResult, wall: float, peak: str) -> Table:
    plan = result.plan
    table = Table(title=f"heapr-serve: {result.out}", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("method", get_method(result.method).summary)
    table.add_row("parameters before", f"{result.source_params:,}")
    table.add_row("parameters after", f"{result.pruned_params:,} ({result.pruned_params / result.source_params:.1%})")
    table.add_row("requested ratio (routed-expert neurons)", f"{plan.ratio:.2%}")
    table.add_row("effective ratio", f"{plan.effective_ratio:.2%}")
    table.add_row("scope / align", f"{plan.scope} / {plan.align}")
    for layer, share in plan.layer_kept_share().items():
        widths = plan.widths[layer]
        table.add_row(f"layer {layer} kept share (min/max width)", f"{share:.1%} ({min(widths)}/{max(widths)})")
    table.add_row("experts at width 0", str(plan.zero_width_experts))
    unrouted = sum(len(e) for e in plan.unrouted.values())
    table.add_row("experts never routed in calibration", str(unrouted))
    if result.heal:
        layers = [r for r in result.heal["layers"].values() if r.get("held_out_before")]
        if layers:
            mean = sum(1 - r["held_out_after"] / r["held_out_before"] for r in layers) / len(layers)
            table.add_row("healed layers (held-out error)", f"{len(layers)} (-{mean:.1%} on average)")
    if result.reconstruct:
        r = result.reconstruct
        reduction = 1 - r["error_after"] / r["error_before"] if r["error_before"] > 0 else 0.0
        table.add_row(f"re-fitted experts ({r['inputs']} inputs, damp {r['damp']:g})",
                      f"{r['experts_refit']} (calibration output error -{reduction:.1%})")
    if result.quantization:
        q = result.quantization
        table.add_row(f"quantized ({q['scheme']}, group {q['group_size'] or 'none'})",
                      f"{q['method'].split(' (')[0]}: {q['weight_bytes_before'] / 2**20:.2f} -> {q['weight_bytes_after'] / 2**20:.2f} MiB")
    table.add_row("wall time", f"{wall:.1f} s")
    table.add_row("peak memory", peak)
    return table


def _check_options(method: str, ratio: float, scope: str, align: int, reconstruct: bool = False,
                   reconstruct_inputs: str = "pruned", reconstruct_damp: float = DEFAULT_DAMP,
                   heal_options: HealOptions | None = None) -> None:
    """Validate the method and the ratio/scope/align flags in a millisecond, before any model is
    loaded, and say which flags the chosen method does not use."""
    allocation = get_method(method).allocate
    check_allocation_options(ratio, scope, align)
    if reconstruct_inputs not in INPUTS:
        raise HeaprError(f"--reconstruct-inputs {reconstruct_inputs!r}: use one of {', '.join(INPUTS)}")
    if not (reconstruct_damp > 0 and reconstruct_damp < 1e6):
        raise HeaprError(f"--reconstruct-damp must be a positive number (got {reconstruct_damp}); {DEFAULT_DAMP:g} is the default")
    if heal_options is not None:
        heal_options.check()
        if reconstruct_inputs != "pruned":
            raise HeaprError("--heal runs layer by layer on the pruned model's own inputs; drop --reconstruct-inputs dense")
    ignored = []
    if reconstruct and allocation is expert_allocation:
        ignored.append("--reconstruct")
    if allocation in (expert_allocation, uniform_allocation) and scope != "global":
        ignored.append("--scope")
    if allocation is expert_allocation and align != 1:
        ignored.append("--align")
    if ignored:
        console.print(f"[bold yellow]warning:[/] --method {method} ignores {' and '.join(ignored)}: "
                      f"it {'removes whole experts' if allocation is expert_allocation else 'gives every expert the same width'}")


def _check_layout(config: dict, refits: bool, heals: bool = False) -> None:
    """--reconstruct and --heal change bias-free experts; gpt-oss's experts have biases."""
    if (refits or heals) and family_for(config).expert_layout != "standard":
        flag = "--heal" if heals else "--reconstruct"
        raise HeaprError(f"{flag} is not supported for {config['model_type']} yet (expert biases); drop {flag}")


def _check_e2e_fits(source: Path, config: dict, dtype: torch.dtype, device: torch.device, batch_size: int, seq_len: int) -> None:
    """--heal-e2e holds the dense teacher and the pruned student, and one batch's graph, at once."""
    need = estimate(source, config, dtype, batch_size, seq_len, 1)
    room = room_for(device)
    total = 2 * need.weights + need.in_memory_activations
    if total > min(room.host, room.device):
        raise HeaprError(f"--heal-e2e holds the dense and the pruned model at once: ~{total / 1024**3:.1f} GiB, "
                         f"{min(room.host, room.device) / 1024**3:.1f} GiB free; drop --heal-e2e (block-wise --heal streams)")


def _refits(method: str, reconstruct: bool) -> bool:
    """--reconstruct does nothing for methods that drop whole experts (the kept ones keep every neuron)."""
    return reconstruct and get_method(method).allocate is not expert_allocation


def _heal_options(heal: bool, steps: int, lr: float, router: bool, batch_tokens: int, holdout: float, target: str,
                  e2e: bool, e2e_steps: int, e2e_lr: float, seed: int) -> HealOptions | None:
    """The healing options, or None without --heal; --heal-e2e implies --heal and needs the model in memory."""
    if e2e and (distributed.ranks_from_env().world > 1):
        raise HeaprError("--heal-e2e holds the dense and the pruned model in one process; run it without torchrun, or drop --heal-e2e")
    if e2e and e2e_steps < 1:
        raise HeaprError(f"--heal-e2e-steps must be at least 1 with --heal-e2e (got {e2e_steps})")
    options = HealOptions(steps, lr, router, batch_tokens, holdout, seed=seed, target=target,
                          e2e_steps=e2e_steps if e2e else 0, e2e_lr=e2e_lr)
    options.check()  # a bad --heal-* value is refused with or without --heal
    return options if heal or e2e else None


def _resolve_quantize(options: QuantizeOptions, source: Path, config: dict, align: int) -> tuple[QuantizeOptions, int]:
    """The group decided and --align raised to it (said once); gpt-oss's expert layout is refused."""
    if family_for(config).expert_layout != "standard":
        raise HeaprError(f"--quantize is not supported for {config['model_type']} yet (expert biases); prune, then run `heapr-serve quantize`")
    resolved, new_align = options.resolve(source, align, int(config["hidden_size"]), dense_expert_width(config))
    if new_align != align:
        console.print(f"--quantize {options.scheme}: groups of {resolved.group_size}, so kept widths are rounded to multiples of "
                      f"{new_align} (--align {new_align}); pass --quant-group-size to choose", highlight=False)
    return resolved, new_align


def _warn_unrouted(plan: PruningPlan, keep_unrouted: bool) -> None:
    unrouted = {layer: e for layer, e in plan.unrouted.items() if e}
    if unrouted:
        listing = "; ".join(f"layer {layer}: experts {e}" for layer, e in unrouted.items())
        fate = "kept whole (--keep-unrouted)" if keep_unrouted else "treated as least important (pass --keep-unrouted to keep them)"
        console.print(f"[bold yellow]warning:[/] {sum(map(len, unrouted.values()))} experts received no calibration tokens, {fate}: {listing}")


def _evaluate_pair(source: Path, out: Path, dtype: torch.dtype, device: torch.device, seq_len: int) -> Table:
    from heapr_serve.eval.command import perplexity_table

    return perplexity_table([source, out], None, seq_len, 8, None, dtype, device)


# --heal's options, the same on compress and apply
_HEAL_OPTION = typer.Option(False, "--heal", help="Heal every pruned layer: tune its kept weights (and router) with Adam so it reproduces the dense layer, layer by layer on the pruned model's inputs.")
_HEAL_STEPS_OPTION = typer.Option(HealOptions.steps, help="--heal: at most N Adam steps per layer (the held-out share stops it earlier).")
_HEAL_LR_OPTION = typer.Option(HealOptions.lr, help="--heal: Adam learning rate, relative to each weight's RMS.")
_HEAL_ROUTER_OPTION = typer.Option(HealOptions.router, "--heal-router/--no-heal-router", help="--heal: tune the router too.")
_HEAL_BATCH_TOKENS_OPTION = typer.Option(HealOptions.batch_tokens, help="--heal: calibration tokens per step (per rank).")
_HEAL_HOLDOUT_OPTION = typer.Option(HealOptions.holdout, help="--heal: share of calibration sequences held out to stop on.")
_HEAL_TARGET_OPTION = typer.Option(HealOptions.target, help="--heal: layer (the dense layer's output on the pruned inputs) or stream (the dense model's own next hidden state).")
_HEAL_E2E_OPTION = typer.Option(False, "--heal-e2e", help="After --heal (implied): end-to-end logit distillation to the dense model (both in memory).")
_HEAL_E2E_STEPS_OPTION = typer.Option(DEFAULT_E2E_STEPS, help="--heal-e2e: at most N steps, one calibration batch each.")
_HEAL_E2E_LR_OPTION = typer.Option(HealOptions.e2e_lr, help="--heal-e2e: Adam learning rate, relative to each weight's RMS.")
_QUANTIZE_OPTION = typer.Option(None, "--quantize", help="Then quantize the pruned checkpoint into the output: a `heapr-serve quantize` --scheme (w4a16, w8a8, fp8, ...).")
_QUANT_METHOD_OPTION = typer.Option("gptq", help="--quantize: gptq (calibrated on this run's tokens, layer by layer) or rtn (round to nearest).")
_QUANT_GROUP_OPTION = typer.Option(None, help="--quantize: group size along the input (-1: per channel; default: the scheme's where it fits, else 64/32/16/8; kept widths are aligned to it).")


def _quantize_options(scheme: str | None, method: str, group_size: int | None) -> QuantizeOptions | None:
    """The --quantize options, checked with or without --quantize (a bad value is never ignored)."""
    options = QuantizeOptions(scheme or "w4a16", method, group_size)
    options.check()
    if scheme is None:
        return None
    if method == "gptq" and distributed.ranks_from_env().world > 1:
        raise HeaprError("--quant-method gptq runs in one process for now; run without torchrun, or pass --quant-method rtn")
    return options


def compress_command(
    model: str = typer.Argument(..., help="Dense MoE model: a local folder or a hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the pruned checkpoint."),
    ratio: float = typer.Option(0.25, help="Share of routed-expert neurons (atomic experts) to remove."),
    scope: str = typer.Option("global", help="global: rank across all MoE layers (HEAPr-G); layer: same share per layer."),
    align: int = typer.Option(1, help="Round kept widths to multiples of N (32 suits vLLM's CPU kernel; 16/64 suit GPUs)."),
    calib: Optional[str] = typer.Option(None, help="Calibration .txt/.jsonl file or folder (default: built-in text)."),
    nsamples: int = typer.Option(64, help="Number of calibration sequences."),
    seq_len: int = typer.Option(256, help="Tokens per calibration sequence."),
    batch_size: int = typer.Option(8, help="Sequences per forward/backward pass."),
    seed: int = typer.Option(0, min=-(2**63), max=2**63 - 1, help="Seed for drawing calibration windows (and for --method random)."),
    dtype: str = typer.Option("auto", help="Calibration dtype: auto (the checkpoint's own; bfloat16 for FP8 sources), float32, bfloat16 (statistics are always float32)."),
    device: str = typer.Option("auto", help="auto (a CUDA GPU when present), cpu, cuda, cuda:N."),
    keep_unrouted: bool = typer.Option(False, help="Keep experts that received no calibration tokens."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
    evaluate: bool = typer.Option(False, "--eval", help="Afterwards, compare held-out perplexity of dense and pruned."),
    method: str = typer.Option("heapr", "--method", help=f"Pruning method: {', '.join(METHODS)} (baselines: docs/quality.md)."),
    streamed: Optional[bool] = typer.Option(None, "--streamed/--no-streamed", help="Materialise one decoder layer at a time (default: only when the model would not fit)."),
    activations_dir: Optional[Path] = typer.Option(None, help="With streaming: keep the saved layer inputs in files here instead of host memory."),
    resume: bool = typer.Option(False, help="Continue an interrupted calibration of this output from its last checkpoint."),
    checkpoint_every: int = typer.Option(8, help="Checkpoint the statistics every N batches (a streamed run reads every layer twice per N batches)."),
    drop_mtp: bool = typer.Option(False, "--drop-mtp", help="Leave out the MTP layer (DeepSeek-V3 / GLM num_nextn_predict_layers, Qwen3-Next / Qwen3.5 mtp.*) instead of keeping it whole."),
    reconstruct_: bool = typer.Option(False, "--reconstruct", help="Re-fit the kept neurons' down-projection columns to the dense expert outputs (least squares on the calibration tokens)."),
    reconstruct_inputs: str = typer.Option("pruned", help="--reconstruct fits layer by layer on the pruned model's own inputs (pruned) or on the dense model's (dense)."),
    reconstruct_damp: float = typer.Option(DEFAULT_DAMP, help="--reconstruct ridge damping, relative to the mean diagonal of each expert's Gram matrix."),
    heal_: bool = _HEAL_OPTION,
    heal_steps: int = _HEAL_STEPS_OPTION,
    heal_lr: float = _HEAL_LR_OPTION,
    heal_router: bool = _HEAL_ROUTER_OPTION,
    heal_batch_tokens: int = _HEAL_BATCH_TOKENS_OPTION,
    heal_holdout: float = _HEAL_HOLDOUT_OPTION,
    heal_target: str = _HEAL_TARGET_OPTION,
    heal_e2e: bool = _HEAL_E2E_OPTION,
    heal_e2e_steps: int = _HEAL_E2E_STEPS_OPTION,
    heal_e2e_lr: float = _HEAL_E2E_LR_OPTION,
    quantize: Optional[str] = _QUANTIZE_OPTION,
    quant_method: str = _QUANT_METHOD_OPTION,
    quant_group_size: Optional[int] = _QUANT_GROUP_OPTION,
) -> None:
    """Score every atomic expert with HEAPr (or a baseline --method) and write a smaller checkpoint."""
    start = time.perf_counter()
    healing = _heal_options(heal_, heal_steps, heal_lr, heal_router, heal_batch_tokens, heal_holdout, heal_target, heal_e2e, heal_e2e_steps, heal_e2e_lr, seed)
    quantizing = _quantize_options(quantize, quant_method, quant_group_size)
    _check_options(method, ratio, scope, align, reconstruct_, reconstruct_inputs, reconstruct_damp, healing)
    ranks = distributed.ranks_from_env()
    torch_device = distributed.device_for(ranks, pick_device(device))
    if batch_size < 1:
        raise HeaprError(f"--batch-size must be at least 1 (got {batch_size})")
    if checkpoint_every < 1:
        raise HeaprError(f"--checkpoint-every must be at least 1 (got {checkpoint_every})")
    if healing is not None and healing.e2e_steps and streamed:
        raise HeaprError("--heal-e2e holds the dense and the pruned model in memory; drop --streamed, or drop --heal-e2e")
    if activations_dir is not None and streamed is False:
        raise HeaprError("--activations-dir holds a streamed run's saved layer inputs; drop it or drop --no-streamed")
    source = resolve_model(model)
    check_output_path(source, out, overwrite, ratio, copies=1 if quantizing is None else 2)  # --quantize: pruned scratch + output
    config = _check_source(source)
    _check_layout(config, _refits(method, reconstruct_), healing is not None)
    refits = _refits(method, reconstruct_) or healing is not None
    if quantizing is not None:
        quantizing, align = _resolve_quantize(quantizing, source, config, align)
    torch_dtype = SourceCheckpoint(source).dtype if dtype == "auto" else pick_dtype(dtype)
    check_fits(source, config, RunOptions(torch_dtype, torch_device, batch_size, streamed, activations_dir, checkpoint_every), seq_len, nsamples)
    if healing is not None and healing.e2e_steps:
        _check_e2e_fits(source, config, torch_dtype, torch_device, batch_size, seq_len)
    tokenizer = load_tokenizer(source)
    calibration = load_calibration(calib, tokenizer, nsamples, seq_len, seed, int(config["vocab_size"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    what = (f"calibrating on {len(calibration.samples)} x {calibration.seq_len} tokens from {calibration.source} "
            f"({torch_device}, {str(torch_dtype).removeprefix('torch.')})")
    batches = list(calibration.batches(batch_size, pad_id))
    loss_scale = float(batch_size * calibration.seq_len)
    fingerprint = source_fingerprint(source)
    identity = {"source_fingerprint": fingerprint, "calibration_sha256": calibration.sha256, "batch_size": batch_size,
                "dtype": str(torch_dtype), "checkpoint_every": checkpoint_every, "world_size": ranks.world}
    opts = RunOptions(torch_dtype, torch_device, batch_size, streamed, activations_dir, checkpoint_every, resume, overwrite,
                      save_final=healing is not None)
    stats = run_calibration(source, config, batches, [int(b[1].sum()) for b in batches], loss_scale, out, identity, opts,
                            lambda dt, dev: load_model(source, dt, dev), what, every_rank=refits)
    if stats is None:  # another rank than 0: rank 0 writes
        return
    stats.metadata.update({"source_model": model_reference(model, source), "model_type": config["model_type"], "calibration": calibration.describe(),
                           "calibration_args": {"calib": calib, "nsamples": nsamples, "seq_len": seq_len, "seed": seed, "batch_size": batch_size},
                           "source_fingerprint": fingerprint})
    gc.collect()
    refit = None
    if refits:
        # a healed layer is saved beside the calibration checkpoint as soon as it is done (--resume)
        heal_identity = {**identity, "heal": None if healing is None else healing.record(), "method": method, "ratio": ratio,
                         "scope": scope, "align": align, "keep_unrouted": keep_unrouted, "reconstruct": _refits(method, reconstruct_),
                         "damp": reconstruct_damp}
        refit = Reconstruction(ranks.share(batches), torch_dtype, torch_device, reconstruct_damp, reconstruct_inputs, activations_dir,
                               refit=_refits(method, reconstruct_), heal=healing,
                               heal_folder=partial_folder(out) / f"heal-rank{ranks.rank}-of-{ranks.world}", heal_identity=heal_identity)
    if not ranks.is_main:  # only with a re-fit: this rank's share of it, then rank 0 writes
        plan = plan_for_method(method, stats, source, ratio, scope, align, keep_unrouted, seed)
        with temporary_folder(out) as folder, progress_bar() as progress:
            refit_plan(source, plan, refit, Path(folder), progress)
        finish_run(out, identity)
        return

    quantize_run = None if quantizing is None else QuantizeRun(quantizing, batches, torch_dtype, torch_device, activations_dir)
    result = prune_to_folder(source, out, stats, ratio, scope, align, keep_unrouted, overwrite, method, seed, drop_mtp, refit, quantize_run)
    finish_run(out, identity)
    _warn_unrouted(result.plan, keep_unrouted)
    console.print(summary_table(result, time.perf_counter() - start, _peak_memory_gib(torch_device)))
    if evaluate:
        console.print(_evaluate_pair(source, out, torch_dtype, torch_device, seq_len))


def _recorded_reconstruction(scores: Path, source: Path, config: dict, stats: ExpertStats, device: torch.device,
                             damp: float, inputs: str) -> Reconstruction:
    """`apply --reconstruct`: the calibration set the scores were computed on, read again and checked
    against its recorded sha256 (the Gram matrices are too big to save beside the scores)."""
    args = stats.metadata.get("calibration_args")
    recorded = stats.metadata.get("calibration", {}).get("sha256")
    if not args or not recorded:
        raise HeaprError(f"{scores}: records no calibration arguments (written by an older heapr-serve); run `heapr-serve compress` with --reconstruct or --heal instead")
    tokenizer = load_tokenizer(source)
    calibration = load_calibration(args["calib"], tokenizer, args["nsamples"], args["seq_len"], args["seed"], int(config["vocab_size"]))
    if calibration.sha256 != recorded:
        raise HeaprError(f"{scores}: the calibration set {args['calib'] or 'builtin'} no longer gives the tokens the scores were computed on; "
                         "run `heapr-serve compress --reconstruct` instead")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Reconstruction(list(calibration.batches(args["batch_size"], pad_id)), SourceCheckpoint(source).dtype, device, damp, inputs)


def apply_command(
    scores: Path = typer.Argument(..., help="heapr_scores.safetensors, or a folder written by compress."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the new pruned checkpoint."),
    ratio: float = typer.Option(..., help="Share of routed-expert neurons to remove."),
    scope: str = typer.Option("global", help="global or layer."),
    align: int = typer.Option(1, help="Round kept widths to multiples of N."),
    model: Optional[str] = typer.Option(None, help="The dense source model (default: the one recorded in the scores)."),
    keep_unrouted: bool = typer.Option(False, help="Keep experts that received no calibration tokens."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
    evaluate: bool = typer.Option(False, "--eval", help="Afterwards, compare held-out perplexity of dense and pruned."),
    method: str = typer.Option("heapr", "--method", help=f"Pruning method: {', '.join(METHODS)}."),
    seed: int = typer.Option(0, min=-(2**63), max=2**63 - 1, help="Seed for --method random."),
    drop_mtp: bool = typer.Option(False, "--drop-mtp", help="Leave out the MTP layer (DeepSeek-V3 / GLM num_nextn_predict_layers, Qwen3-Next / Qwen3.5 mtp.*) instead of keeping it whole."),
    reconstruct_: bool = typer.Option(False, "--reconstruct", help="Re-fit the kept down-projection columns (re-reads the calibration set the scores recorded: one forward pass)."),
    reconstruct_inputs: str = typer.Option("pruned", help="pruned (layer by layer on the pruned model's inputs) or dense."),
    reconstruct_damp: float = typer.Option(DEFAULT_DAMP, help="Ridge damping relative to the mean Gram diagonal."),
    device: str = typer.Option("auto", help="For --reconstruct and --heal: auto (a CUDA GPU when present), cpu, cuda, cuda:N."),
    heal_: bool = _HEAL_OPTION,
    heal_steps: int = _HEAL_STEPS_OPTION,
    heal_lr: float = _HEAL_LR_OPTION,
    heal_router: bool = _HEAL_ROUTER_OPTION,
    heal_batch_tokens: int = _HEAL_BATCH_TOKENS_OPTION,
    heal_holdout: float = _HEAL_HOLDOUT_OPTION,
    heal_target: str = _HEAL_TARGET_OPTION,
    heal_e2e: bool = _HEAL_E2E_OPTION,
    heal_e2e_steps: int = _HEAL_E2E_STEPS_OPTION,
    heal_e2e_lr: float = _HEAL_E2E_LR_OPTION,
    quantize: Optional[str] = _QUANTIZE_OPTION,
    quant_method: str = _QUANT_METHOD_OPTION,
    quant_group_size: Optional[int] = _QUANT_GROUP_OPTION,
) -> None:
    """Re-prune at another ratio (or with another --method) from saved statistics, without calibrating again."""
    start = time.perf_counter()
    healing = _heal_options(heal_, heal_steps, heal_lr, heal_router, heal_batch_tokens, heal_holdout, heal_target, heal_e2e, heal_e2e_steps, heal_e2e_lr, seed)
    quantizing = _quantize_options(quantize, quant_method, quant_group_size)
    _check_options(method, ratio, scope, align, reconstruct_, reconstruct_inputs, reconstruct_damp, healing)
    torch_device = pick_device(device)
    stats = ExpertStats.load(scores)
    recorded = stats.metadata.get("source_model")
    if model is None and not recorded:
        raise HeaprError(f"{scores}: records no source model; pass --model DENSE_FOLDER")
    source = resolve_model(model or recorded)
    check_output_path(source, out, overwrite, ratio, copies=1 if quantizing is None else 2)  # --quantize: pruned scratch + output
    config = _check_source(source)
    _check_layout(config, _refits(method, reconstruct_), healing is not None)
    if stats.metadata.get("model_type") not in (None, config["model_type"]):
        raise HeaprError(f"{scores}: scores are for a {stats.metadata['model_type']} model but {source} is {config['model_type']}; pass the right --model")
    if stats.metadata.get("source_fingerprint") not in (None, source_fingerprint(source)):
        raise HeaprError(f"{scores}: scores were computed on other weights than those now in {source} (retrained or replaced?); re-run `heapr-serve compress`")
    if quantizing is not None:
        quantizing, align = _resolve_quantize(quantizing, source, config, align)
    refit = quantize_run = None
    if _refits(method, reconstruct_) or healing is not None or (quantizing is not None and quantizing.method == "gptq"):
        recorded = _recorded_reconstruction(scores, source, config, stats, torch_device, reconstruct_damp, reconstruct_inputs)
        recorded.refit, recorded.heal = _refits(method, reconstruct_), healing
        if recorded.refit or healing is not None:
            refit = recorded
        if quantizing is not None:
            quantize_run = QuantizeRun(quantizing, recorded.batches, recorded.dtype, torch_device)
    elif quantizing is not None:
        quantize_run = QuantizeRun(quantizing, [], SourceCheckpoint(source).dtype, torch_device)
    result = prune_to_folder(source, out, stats, ratio, scope, align, keep_unrouted, overwrite, method, seed, drop_mtp, refit, quantize_run)
    _warn_unrouted(result.plan, keep_unrouted)
    console.print(summary_table(result, time.perf_counter() - start, _peak_memory_gib(torch_device)))
    if evaluate:
        console.print(_evaluate_pair(source, out, torch.float32, torch.device("cpu"), 256))
