"""The flags `compress` and `apply` share, and the one place they become a `PruneOptions`.

A flag for a stage that was not asked for (a bad --heal-lr without --heal, a bad --quant-group-size
without --quantize) is still checked, so a bad value is never silently ignored; a flag the chosen
method has no use for is said once, as a warning.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from heapr_serve.checkpoint.format import dense_expert_width
from heapr_serve.errors import HeaprError
from heapr_serve.families import family_for
from heapr_serve.progress import console
from heapr_serve.prune.heal import DEFAULT_E2E_STEPS, HealOptions
from heapr_serve.prune.methods import expert_allocation, get_method, uniform_allocation
from heapr_serve.prune.options import PruneOptions
from heapr_serve.quantize.options import QuantizeOptions
from heapr_serve.score import distributed

HEAL = typer.Option(False, "--heal", help="Heal every pruned layer: tune its kept weights (and router) with Adam so it reproduces the dense layer, layer by layer on the pruned model's inputs.")
HEAL_STEPS = typer.Option(HealOptions.steps, help="--heal: at most N Adam steps per layer (the held-out share stops it earlier).")
HEAL_EPOCHS = typer.Option(HealOptions.epochs, help="--heal: steps per layer = this many passes over the training tokens (at --heal-batch-tokens a step), up to --heal-steps.")
HEAL_LR = typer.Option(HealOptions.lr, help="--heal: Adam learning rate, relative to each weight's RMS.")
HEAL_ROUTER = typer.Option(HealOptions.router, "--heal-router/--no-heal-router", help="--heal: tune the router too.")
HEAL_BATCH_TOKENS = typer.Option(HealOptions.batch_tokens, help="--heal: calibration tokens per step (per rank).")
HEAL_HOLDOUT = typer.Option(HealOptions.holdout, help="--heal: share of calibration sequences held out to stop on.")
HEAL_TARGET = typer.Option(HealOptions.target, help="--heal: layer (the dense layer's output on the pruned inputs) or stream (the dense model's own next hidden state).")
HEAL_E2E = typer.Option(False, "--heal-e2e", help="After --heal (implied): end-to-end logit distillation to the dense model (both in memory).")
HEAL_E2E_STEPS = typer.Option(DEFAULT_E2E_STEPS, help="--heal-e2e: at most N steps, one calibration batch each.")
HEAL_E2E_LR = typer.Option(HealOptions.e2e_lr, help="--heal-e2e: Adam learning rate, relative to each weight's RMS.")
QUANTIZE = typer.Option(None, "--quantize", help="Then quantize the pruned checkpoint into the output: a `heapr-serve quantize` --scheme (w4a16, w8a8, fp8, ...).")
QUANT_METHOD = typer.Option("gptq", help="--quantize: gptq (calibrated on this run's tokens, layer by layer) or rtn (round to nearest).")
QUANT_GROUP = typer.Option(None, help="--quantize: group size along the input (-1: per channel; default: the scheme's where it fits, else 64/32/16/8; kept widths are aligned to it).")


def heal_options(heal: bool, steps: int, epochs: float, lr: float, router: bool, batch_tokens: int, holdout: float, target: str,
                 e2e: bool, e2e_steps: int, e2e_lr: float, seed: int) -> HealOptions | None:
    """The healing options, or None without --heal; --heal-e2e implies --heal and needs the model in memory."""
    if e2e and (distributed.ranks_from_env().world > 1):
        raise HeaprError("--heal-e2e holds the dense and the pruned model in one process; run it without torchrun, or drop --heal-e2e")
    if e2e and e2e_steps < 1:
        raise HeaprError(f"--heal-e2e-steps must be at least 1 with --heal-e2e (got {e2e_steps})")
    options = HealOptions(steps, lr, router, batch_tokens, holdout, seed=seed, target=target, epochs=epochs,
                          e2e_steps=e2e_steps if e2e else 0, e2e_lr=e2e_lr)
    options.check()  # a bad --heal-* value is refused with or without --heal
    return options if heal or e2e else None


def quantize_options(scheme: str | None, method: str, group_size: int | None) -> QuantizeOptions | None:
    """The --quantize options, checked with or without --quantize (a bad value is never ignored)."""
    options = QuantizeOptions(scheme or "w4a16", method, group_size)
    options.check()
    if scheme is None:
        return None
    if method == "gptq" and distributed.ranks_from_env().world > 1:
        raise HeaprError("--quant-method gptq runs in one process for now; run without torchrun, or pass --quant-method rtn")
    return options


def prune_options(ratio: float, method: str, scope: str, align: int, keep_unrouted: bool, seed: int, drop_mtp: bool,
                  overwrite: bool, reconstruct: bool, reconstruct_inputs: str, reconstruct_damp: float,
                  heal: HealOptions | None, quantize: QuantizeOptions | None) -> PruneOptions:
    """The options the flags ask for, checked; --reconstruct does nothing for methods that drop whole
    experts (the kept ones keep every neuron), so it is left off for them, with the other flags the
    method has no use for named in one warning."""
    allocation = get_method(method).allocate
    options = PruneOptions(ratio, method, scope, align, keep_unrouted, seed, drop_mtp, overwrite,
                           reconstruct and allocation is not expert_allocation, reconstruct_inputs, reconstruct_damp, heal, quantize)
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
    return options


def for_source(options: PruneOptions, source: Path, config: dict) -> PruneOptions:
    """With --quantize: the group decided and --align raised to it (said once); gpt-oss's expert layout
    is refused. Without, the options as they are."""
    if options.quantize is None:
        return options
    if family_for(config).expert_layout != "standard":
        raise HeaprError(f"--quantize is not supported for {config['model_type']} yet (expert biases); prune, then run `heapr-serve quantize`")
    resolved, align = options.quantize.resolve(source, options.align, int(config["hidden_size"]), dense_expert_width(config))
    if align != options.align:
        console.print(f"--quantize {options.quantize.scheme}: groups of {resolved.group_size}, so kept widths are rounded to multiples of "
                      f"{align} (--align {align}); pass --quant-group-size to choose", highlight=False)
    return replace(options, quantize=resolved, align=align)
