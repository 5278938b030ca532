"""The README.md that travels with a pruned checkpoint: what was done, and the before/after table."""

from __future__ import annotations

from pathlib import Path


def _reduction(record: dict) -> str:
    before = record.get("error_before", 0.0)
    return f"{1 - record['error_after'] / before:.1%}" if before > 0 else "0%"


def _source_quantization(q: dict) -> str:
    """FP8 sources are block-quantised (weight_block_size); MXFP4 ones (gpt-oss) quantise the expert stacks."""
    if q.get("weight_block_size"):
        return f"{q.get('quant_method')} block-quantised ({q.get('weight_block_size')})"
    return f"{q.get('quant_method')}-quantised (its expert stacks)"


def write_model_card(folder: Path, config: dict, plan, source_params: int, pruned_params: int, name: str) -> None:
    """`folder` is the staging folder; `name` the output's final name, for the title."""
    heapr = config["heapr"]
    calib = heapr.get("calibration", {})
    method = heapr.get("method", "heapr")
    summary = heapr.get("method_summary", method)
    lines = [
        f"# {name}: {heapr['source_architectures'][0]} pruned by heapr-serve (`{method}`)",
        "",
        f"Pruned from `{heapr['source_model']}` with heapr-serve, method `{method}`: {summary}.",
        "Shared experts and attention are unchanged" + ("" if heapr.get("heal", {}).get("router") else ", and so is the router")
        + "; each routed expert keeps its own width.",
        "",
        "| | before | after |",
        "|---|---:|---:|",
        f"| parameters | {source_params:,} | {pruned_params:,} ({pruned_params / source_params:.1%}) |",
        f"| routed-expert neurons | {plan.total:,} | {plan.kept:,} ({1 - plan.effective_ratio:.1%}) |",
        f"| experts at width 0 | 0 | {plan.zero_width_experts} |",
        "",
        f"Requested ratio {heapr['ratio']:.2%}, effective {heapr['effective_ratio']:.2%}, scope `{heapr['scope']}`, align {heapr['align']}.",
        f"Calibration: {calib.get('source', '?')}, {calib.get('nsamples', '?')} x {calib.get('seq_len', '?')} tokens, sha256 `{calib.get('sha256', '?')[:16]}`.",
        *[f"Layer {layer} is kept whole at the dense width: {reason}." for layer, reason in (heapr.get("kept_whole_layers") or {}).items()],
        *[f"Layer {layer} was left out: {reason}." for layer, reason in (heapr.get("dropped_layers") or {}).items()],
        *([f"The source was {_source_quantization(heapr['source_quantization'])}; this checkpoint holds it dequantised to "
           f"{heapr['source_quantization'].get('written_as')}."] if heapr.get("source_quantization") else []),
        *([f"The kept neurons' down-projection columns were re-fitted (`--reconstruct`, {heapr['reconstruct']['inputs']} inputs, "
           f"damp {heapr['reconstruct']['damp']:g}) to the dense experts' outputs on the calibration tokens: "
           f"{heapr['reconstruct']['experts_refit']} experts re-fitted, their calibration output error "
           f"{_reduction(heapr['reconstruct'])} lower."] if heapr.get("reconstruct") else []),
        *([f"Every pruned MoE layer was healed (`--heal`"
           f"{', starting from the least-squares re-fit of --reconstruct' if heapr['heal'].get('reconstruct_start') else ''}): its kept gate, up and down weights"
           f"{' and its router' if heapr['heal']['router'] else ''} tuned by Adam, layer by layer on the pruned model's own "
           f"inputs, to reproduce the dense layer's output on the calibration tokens ({heapr['heal']['steps']} steps at most, "
           f"lr {heapr['heal']['lr']:g} of each weight's RMS); held-out relative error per layer: "
           + ", ".join(f"{layer}: {r['held_out_before']:.3g} -> {r['held_out_after']:.3g}" for layer, r in heapr['heal']['layers'].items() if 'held_out_before' in r)
           + "."] if heapr.get("heal") else []),
        "",
        "| layer | kept share | min width | max width | width-0 experts |",
        "|---:|---:|---:|---:|---:|",
    ]
    for layer, share in plan.layer_kept_share().items():
        w = plan.widths[layer]
        lines.append(f"| {layer} | {share:.1%} | {min(w)} | {max(w)} | {sum(x == 0 for x in w)} |")
    lines += [
        "",
        "Load it with `import heapr_serve` then `AutoModelForCausalLM.from_pretrained(folder)`, or serve it with",
        "`heapr-serve serve folder` (vLLM with the heapr-serve plugin). The `heapr` section of config.json lists",
        "every expert's width; `heapr_scores.safetensors` lets `heapr-serve apply` re-prune at another ratio.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
