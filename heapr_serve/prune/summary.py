"""What `compress` and `apply` say when they are done: the summary table, the unrouted experts, and
the perplexity of the dense and the pruned model (`--eval`)."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from rich.table import Table

from heapr_serve.progress import console
from heapr_serve.prune.allocation import PruningPlan
from heapr_serve.prune.methods import get_method
from heapr_serve.prune.to_folder import PruneResult


def peak_memory_gib(device: torch.device) -> str:
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


def warn_unrouted(plan: PruningPlan, keep_unrouted: bool) -> None:
    unrouted = {layer: e for layer, e in plan.unrouted.items() if e}
    if unrouted:
        listing = "; ".join(f"layer {layer}: experts {e}" for layer, e in unrouted.items())
        fate = "kept whole (--keep-unrouted)" if keep_unrouted else "treated as least important (pass --keep-unrouted to keep them)"
        console.print(f"[bold yellow]warning:[/] {sum(map(len, unrouted.values()))} experts received no calibration tokens, {fate}: {listing}")


def evaluate_pair(source: Path, out: Path, dtype: torch.dtype, device: torch.device, seq_len: int) -> Table:
    from heapr_serve.eval.command import perplexity_table

    return perplexity_table([source, out], None, seq_len, 8, None, dtype, device)
