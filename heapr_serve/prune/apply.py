"""`heapr-serve apply`: re-prune at another ratio (or with another --method) from the statistics saved
beside an earlier output, without calibrating again; `--reconstruct`, `--heal` and GPTQ read the
recorded calibration set again (heapr_serve.prune.to_folder does the rest, as for `compress`).
"""

from __future__ import annotations

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
from heapr_serve.models import load_tokenizer, pick_device, resolve_model
from heapr_serve.progress import console
from heapr_serve.prune import flags
from heapr_serve.prune.methods import METHODS
from heapr_serve.prune.reconstruct import DEFAULT_DAMP
from heapr_serve.prune.summary import evaluate_pair, peak_memory_gib, summary_table, warn_unrouted
from heapr_serve.prune.to_folder import RetuneRun, check_source, prune_to_folder
from heapr_serve.score.stats import ExpertStats


def _recorded_calibration(scores: Path, source: Path, config: dict, stats: ExpertStats, device: torch.device) -> RetuneRun:
    """The calibration set the scores were computed on, read again and checked against its recorded
    sha256 (the Gram matrices are too big to save beside the scores)."""
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
    return RetuneRun(list(calibration.batches(args["batch_size"], pad_id)), SourceCheckpoint(source).dtype, device)


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
    """Re-prune at another ratio (or with another --method) from saved statistics, without calibrating again."""
    start = time.perf_counter()
    options = flags.prune_options(
        ratio, method, scope, align, keep_unrouted, seed, drop_mtp, overwrite, reconstruct_, reconstruct_inputs, reconstruct_damp,
        flags.heal_options(heal_, heal_steps, heal_epochs, heal_lr, heal_router, heal_batch_tokens, heal_holdout, heal_target, heal_e2e, heal_e2e_steps, heal_e2e_lr, seed),
        flags.quantize_options(quantize, quant_method, quant_group_size))
    torch_device = pick_device(device)
    stats = ExpertStats.load(scores)
    recorded = stats.metadata.get("source_model")
    if model is None and not recorded:
        raise HeaprError(f"{scores}: records no source model; pass --model DENSE_FOLDER")
    source = resolve_model(model or recorded)
    check_output_path(source, out, options.overwrite, options.ratio, copies=options.output_copies)
    config = check_source(source)
    options.check_layout(config)
    if stats.metadata.get("model_type") not in (None, config["model_type"]):
        raise HeaprError(f"{scores}: scores are for a {stats.metadata['model_type']} model but {source} is {config['model_type']}; pass the right --model")
    if stats.metadata.get("source_fingerprint") not in (None, source_fingerprint(source)):
        raise HeaprError(f"{scores}: scores were computed on other weights than those now in {source} (retrained or replaced?); re-run `heapr-serve compress`")
    options = flags.for_source(options, source, config)
    retune = quantize_run = None
    if options.quantize is not None:
        from heapr_serve.quantize.after_pruning import QuantizeRun  # compressed-tensors: only when the stage runs
    if options.retunes or (options.quantize is not None and options.quantize.method == "gptq"):
        calibration = _recorded_calibration(scores, source, config, stats, torch_device)
        if options.retunes:
            retune = calibration
        if options.quantize is not None:
            quantize_run = QuantizeRun(options.quantize, calibration.batches, calibration.dtype, torch_device)
    elif options.quantize is not None:
        quantize_run = QuantizeRun(options.quantize, [], SourceCheckpoint(source).dtype, torch_device)
    result = prune_to_folder(source, out, stats, options, retune, quantize_run)
    warn_unrouted(result.plan, keep_unrouted)
    console.print(summary_table(result, time.perf_counter() - start, peak_memory_gib(torch_device)))
    if evaluate:
        console.print(evaluate_pair(source, out, torch.float32, torch.device("cpu"), 256))
