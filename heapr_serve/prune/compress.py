"""`heapr-serve compress`: calibrate, score, prune, write.

The lifecycle is: check every input (so bad input fails in a second, before any model is loaded) ->
calibrate (one forward + one backward pass, collecting HEAPr statistics) -> free the model -> plan
the pruning -> stream the pruned checkpoint into a staging folder -> rename it into place
(heapr_serve.prune.to_folder).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Optional

import torch
import typer

from heapr_serve.calibrate.datasets import load_calibration
from heapr_serve.checkpoint.format import source_fingerprint
from heapr_serve.checkpoint.source import SourceCheckpoint
from heapr_serve.checkpoint.writer import check_output_path
from heapr_serve.errors import HeaprError
from heapr_serve.models import load_model, load_tokenizer, model_reference, pick_device, pick_dtype, resolve_model
from heapr_serve.progress import console, progress_bar
from heapr_serve.prune import flags
from heapr_serve.prune.methods import METHODS, plan_for_method
from heapr_serve.prune.reconstruct import DEFAULT_DAMP, temporary_folder
from heapr_serve.prune.summary import evaluate_pair, peak_memory_gib, summary_table, warn_unrouted
from heapr_serve.prune.to_folder import RetuneRun, check_source, prune_to_folder, retune_plan
from heapr_serve.score import distributed
from heapr_serve.score.checkpointing import partial_folder
from heapr_serve.score.memory import estimate, room_for
from heapr_serve.score.run import RunOptions, check_fits, finish_run, run_calibration


def _check_e2e_fits(source: Path, config: dict, dtype: torch.dtype, device: torch.device, batch_size: int, seq_len: int) -> None:
    """--heal-e2e holds the dense teacher and the pruned student, and one batch's graph, at once."""
    need = estimate(source, config, dtype, batch_size, seq_len, 1)
    room = room_for(device)
    total = 2 * need.weights + need.in_memory_activations
    if total > min(room.host, room.device):
        raise HeaprError(f"--heal-e2e holds the dense and the pruned model at once: ~{total / 1024**3:.1f} GiB, "
                         f"{min(room.host, room.device) / 1024**3:.1f} GiB free; drop --heal-e2e (block-wise --heal streams)")


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
    heal_: bool = flags.HEAL,
    heal_steps: int = flags.HEAL_STEPS,
    heal_epochs: float = flags.HEAL_EPOCHS,
    heal_lr: float = flags.HEAL_LR,
    heal_router: bool = flags.HEAL_ROUTER,
    heal_batch_tokens: int = flags.HEAL_BATCH_TOKENS,
    heal_holdout: float = flags.HEAL_HOLDOUT,
    heal_target: str = flags.HEAL_TARGET,
    heal_e2e: bool = flags.HEAL_E2E,
    heal_e2e_steps: int = flags.HEAL_E2E_STEPS,
    heal_e2e_lr: float = flags.HEAL_E2E_LR,
    quantize: Optional[str] = flags.QUANTIZE,
    quant_method: str = flags.QUANT_METHOD,
    quant_group_size: Optional[int] = flags.QUANT_GROUP,
) -> None:
    """Score every atomic expert with HEAPr (or a baseline --method) and write a smaller checkpoint."""
    start = time.perf_counter()
    options = flags.prune_options(
        ratio, method, scope, align, keep_unrouted, seed, drop_mtp, overwrite, reconstruct_, reconstruct_inputs, reconstruct_damp,
        flags.heal_options(heal_, heal_steps, heal_epochs, heal_lr, heal_router, heal_batch_tokens, heal_holdout, heal_target, heal_e2e, heal_e2e_steps, heal_e2e_lr, seed),
        flags.quantize_options(quantize, quant_method, quant_group_size))
    ranks = distributed.ranks_from_env()
    torch_device = distributed.device_for(ranks, pick_device(device))
    if batch_size < 1:
        raise HeaprError(f"--batch-size must be at least 1 (got {batch_size})")
    if checkpoint_every < 1:
        raise HeaprError(f"--checkpoint-every must be at least 1 (got {checkpoint_every})")
    e2e = options.heal is not None and options.heal.e2e_steps
    if e2e and streamed:
        raise HeaprError("--heal-e2e holds the dense and the pruned model in memory; drop --streamed, or drop --heal-e2e")
    if activations_dir is not None and streamed is False:
        raise HeaprError("--activations-dir holds a streamed run's saved layer inputs; drop it or drop --no-streamed")
    source = resolve_model(model)
    check_output_path(source, out, options.overwrite, options.ratio, copies=options.output_copies)
    config = check_source(source)
    options.check_layout(config)
    options = flags.for_source(options, source, config)
    torch_dtype = SourceCheckpoint(source).dtype if dtype == "auto" else pick_dtype(dtype)
    run = RunOptions(torch_dtype, torch_device, batch_size, streamed, activations_dir, checkpoint_every, resume, overwrite,
                     save_final=options.heal is not None)
    check_fits(source, config, run, seq_len, nsamples)
    if e2e:
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
    stats = run_calibration(source, config, batches, [int(b[1].sum()) for b in batches], loss_scale, out, identity, run,
                            lambda dt, dev: load_model(source, dt, dev), what, every_rank=options.retunes)
    if stats is None:  # another rank than 0: rank 0 writes
        return
    stats.metadata.update({"source_model": model_reference(model, source), "model_type": config["model_type"], "calibration": calibration.describe(),
                           "calibration_args": {"calib": calib, "nsamples": nsamples, "seq_len": seq_len, "seed": seed, "batch_size": batch_size},
                           "source_fingerprint": fingerprint})
    gc.collect()
    retune = None
    if options.retunes:
        # a healed layer is saved beside the calibration checkpoint as soon as it is done (--resume)
        retune = RetuneRun(ranks.share(batches), torch_dtype, torch_device, activations_dir,
                           heal_folder=partial_folder(out) / f"heal-rank{ranks.rank}-of-{ranks.world}",
                           heal_identity={**identity, **options.heal_identity()})
    if not ranks.is_main:  # only with a re-fit: this rank's share of it, then rank 0 writes
        plan = plan_for_method(stats, source, options)
        with temporary_folder(out) as folder, progress_bar() as progress:
            retune_plan(source, plan, options, retune, Path(folder), progress)
        finish_run(out, identity)
        return

    quantize_run = None
    if options.quantize is not None:
        from heapr_serve.quantize.after_pruning import QuantizeRun  # compressed-tensors: only when the stage runs

        quantize_run = QuantizeRun(options.quantize, batches, torch_dtype, torch_device, activations_dir)
    result = prune_to_folder(source, out, stats, options, retune, quantize_run)
    finish_run(out, identity)
    warn_unrouted(result.plan, keep_unrouted)
    console.print(summary_table(result, time.perf_counter() - start, peak_memory_gib(torch_device)))
    if evaluate:
        console.print(evaluate_pair(source, out, torch_dtype, torch_device, seq_len))
