"""`heapr-serve inspect`: parameters before/after, per-layer width summary, experts at width 0.

Reads only config.json and the safetensors headers, so it is instant on any size of model.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from heapr_serve.checkpoint.format import count_source_params
from heapr_serve.families import family_for
from heapr_serve.progress import console
from heapr_serve.checkpoint.format import is_pruned, read_config
from heapr_serve.checkpoint.validate import validate_checkpoint


def inspect_command(checkpoint: Path) -> None:
    """Summarise a dense or pruned checkpoint."""
    config = read_config(checkpoint)
    family = family_for(config)
    params = count_source_params(checkpoint)
    if not is_pruned(checkpoint):
        console.print(f"{checkpoint}: dense {family.architecture}, {params:,} parameters (not pruned by heapr-serve)")
        _print_quantization(config.get("heapr_quantization"))
        return
    ckpt = validate_checkpoint(checkpoint)
    heapr = ckpt.heapr
    table = Table(title=f"{checkpoint}: {family.pruned_architecture} (checked: every expert tensor matches its declared width)")
    for col in ("layer", "experts", "kept share", "min", "mean", "max", "width 0"):
        table.add_column(col, justify="right")
    for layer, widths in ckpt.widths.items():
        table.add_row(str(layer), str(len(widths)), f"{sum(widths) / (len(widths) * ckpt.dense_width):.1%}", str(min(widths)),
                      f"{sum(widths) / len(widths):.1f}", str(max(widths)), str(sum(w == 0 for w in widths)))
    console.print(table)
    before = heapr.get("source_params")
    console.print(
        f"parameters: {before:,} before -> {params:,} after ({params / before:.1%})" if before else f"parameters: {params:,}"
    )
    console.print(
        f"method {heapr.get('method')}, requested ratio {heapr.get('ratio')}, effective {heapr.get('effective_ratio')}, "
        f"scope {heapr.get('scope')}, align {heapr.get('align')}, dense width {ckpt.dense_width}, "
        f"experts at width 0: {sum(w == 0 for ws in ckpt.widths.values() for w in ws)}, source {heapr.get('source_model')}"
    )
    for layer, reason in ckpt.kept_whole.items():
        console.print(f"layer {layer} kept whole at the dense width: {reason}")
    _print_quantization(heapr.get("quantization"), config.get("quantization_config"))
    if heapr.get("source_quantization"):
        q = heapr["source_quantization"]
        how = f"{q.get('weight_block_size')}-block quantised" if q.get("weight_block_size") else "quantised"
        console.print(f"source was {q.get('quant_method')} {how}; written dequantised to {q.get('written_as')}")


def _print_quantization(record: dict | None, qconfig: dict | None = None) -> None:
    """The scheme `heapr-serve quantize` recorded, and the bytes it saved on the weights it quantized; for
    a folder another tool quantized (llm-compressor), the scheme its quantization_config declares."""
    if qconfig and not (record and "weight_bytes_before" in record):
        from heapr_serve.quantize.layout import QuantSpec

        spec = QuantSpec.from_config(qconfig)
        how = f"group {spec.group_size}" if spec.strategy == "group" else f"per {spec.strategy}"
        console.print(f"quantized by {(record or {}).get('written_by', 'another tool')}: {spec.bits}-bit {spec.kind}, {how} "
                      f"({spec.format}), {len(qconfig.get('ignore') or [])} modules left unquantized", highlight=False)
        return
    if not record:
        return
    before, after = record["weight_bytes_before"], record["weight_bytes_after"]
    console.print(f"quantized {record['scheme']} ({record['format']}, {record['summary']}): {record['quantized_tensors']} Linear "
                  f"weights {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB (-{1 - after / max(before, 1):.1%}), "
                  f"{record['ignored_modules']} left unquantized", highlight=False)
