"""Writing a compressed-tensors folder from a dense or pruned one: `quantize_folder`, which the
`quantize` command and `compress/apply --quantize` (heapr_serve.quantize.after_pruning) share.

Tensors are streamed one at a time (any model size fits in memory) and quantized by round-to-nearest
with compressed-tensors' own scale and packing code (heapr_serve.quantize.rtn), or take the values a
GPTQ pass computed; the output goes through a staging folder renamed only when complete. Every Linear
weight is quantized except the router gates and the LM head, which stay in the source dtype and are
listed in the config's `ignore` (llm-compressor's recipe for MoE models).
"""

from __future__ import annotations

import json
import re
import shutil
from fnmatch import fnmatch
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

from heapr_serve.checkpoint.format import PER_EXPERT_TENSOR, is_pruned, open_safetensors, read_config, safetensors_files
from heapr_serve.checkpoint.source import RawSafetensors
from heapr_serve.checkpoint.writer import _TRAVELLING_FILES, DEFAULT_SHARD_BYTES, _ShardWriter, check_output_path
from heapr_serve.errors import HeaprError
from heapr_serve.families import family_for
from heapr_serve.preflight import staged_folder
from heapr_serve.progress import console, progress_bar
from heapr_serve.quantize.rtn import alignment_unit, quantize_weight
from heapr_serve.quantize.schemes import scheme_for


DEFAULT_IGNORE = (r".*\.gate$", r".*\.shared_expert_gate$", r"(.*\.)?lm_head$",
                  r"(.*\.)?visual\..*", r"(.*\.)?mtp\..*")  # vision towers and MTP heads (not served by the text model)
_NOT_LINEAR = re.compile(r"(embed_tokens|embeddings|wte|wpe)$")


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and not _NOT_LINEAR.search(name[: -len(".weight")])


def plan_tensors(folder: Path, ignore: list[re.Pattern]) -> tuple[dict[str, str], list[str], dict[str, tuple[int, ...]]]:
    """(tensor -> file, module names left unquantized, tensor -> shape) from the headers alone."""
    files = safetensors_files(folder)
    shapes, skipped = {}, []
    for file in sorted(set(files.values())):
        with open_safetensors(folder / file) as f:
            for name in f.keys():
                piece = f.get_slice(name)
                if piece.get_dtype().startswith("F8") or name.endswith(("_scale_inv", "weight_scale", "weight_packed")):
                    raise HeaprError(f"{folder / file}: tensor {name} is already quantized; quantize from a bfloat16 / "
                                     "float32 folder (for an FP8 source, `heapr-serve compress` writes it dequantised)")
                shapes[name] = tuple(piece.get_shape())
    for name, shape in shapes.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module and is_linear_weight(name, shape) and any(p.fullmatch(module) for p in ignore):
            skipped.append(module)
    return files, sorted(skipped), shapes


def _check_alignment(folder: Path, shapes: dict[str, tuple[int, ...]], quantized: set[str], scheme_name: str, unit: tuple[int, int]) -> None:
    """Every quantized weight's dimensions must hold whole groups / blocks: name the first that does not, and the fix."""
    unit_out, unit_in = unit
    if unit == (1, 1):
        return
    for name in sorted(quantized):
        out_f, in_f = shapes[name]
        if out_f % unit_out == 0 and in_f % unit_in == 0:
            continue
        m = PER_EXPERT_TENSOR.match(name)
        what = f"expert {m['expert']} of layer {m['layer']} ({name}, {list(shapes[name])})" if m else f"{name} {list(shapes[name])}"
        need = unit_in if in_f % unit_in else unit_out
        fix = (f"re-run `heapr-serve compress` / `apply` with --align {need}" if m and is_pruned(folder)
               else f"leave it out with --ignore '{re.escape(name[: -len('.weight')])}'")
        other = "--group-size -1 (per channel), a --group-size that divides it" if unit_out == 1 else "another --scheme"
        raise HeaprError(f"--scheme {scheme_name}: {what} is not a multiple of the scheme's {unit_out}x{unit_in} quantization "
                         f"unit; {fix}, or pass {other}")


def quantize_folder(source: Path, out: Path, scheme_name: str, group_size: int | None, ignore: list[str],
                    overwrite: bool, only_experts: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    calibrate=None, carry: tuple[str, ...] = ()) -> dict:
    """Write the quantized copy of `source` to `out`; returns the record stored in its config.
    `calibrate(scheme, fmt, modules)` (GPTQ) runs once the scheme is settled, for the transformers
    module names of the weights to quantize, and returns (lookup, method): `lookup(name)` gives a
    weight's compressed tensors by its on-disk name (None: round to nearest)."""
    config = read_config(source)
    family_for(config)  # an unknown family is refused before any work
    if config.get("quantization_config"):
        raise HeaprError(f"{source / 'config.json'}: already has a quantization_config "
                         f"({config['quantization_config'].get('quant_method')}); quantize from a bfloat16 / float32 folder")
    spec = scheme_for(scheme_name)
    pruned = is_pruned(source)
    if pruned:
        from heapr_serve.checkpoint.validate import validate_checkpoint

        validate_checkpoint(source)  # widths vs tensors, before anything is written
    check_output_path(source, out, overwrite)
    patterns = [re.compile(p) for p in (*DEFAULT_IGNORE, *ignore)]
    files, skipped, shapes = plan_tensors(source, patterns)
    skipped_set = set(skipped)
    if only_experts:  # attention, dense MLPs and shared experts stay in the source dtype, listed in `ignore`
        kept = sorted(n[: -len(".weight")] for n, s in shapes.items()
                      if is_linear_weight(n, s) and not PER_EXPERT_TENSOR.match(n) and n[: -len(".weight")] not in skipped_set)
        skipped, skipped_set = sorted(skipped + kept), skipped_set | set(kept)
    quantized = {n for n, s in shapes.items() if is_linear_weight(n, s) and n[: -len(".weight")] not in skipped_set}
    if not quantized:
        raise HeaprError(f"{source}: no Linear weights left to quantize (all matched --ignore)")
    if group_size is None:
        group_size = spec.fitting_group(sorted({shapes[n][1] for n in quantized}))
        preset = spec.build(None).weights.group_size
        if group_size is not None and group_size != preset:
            console.print(f"{scheme_name}: groups of {group_size if group_size > 0 else 'one channel'} (the scheme's {preset} does not divide "
                          f"every quantized weight's input width; pass --group-size to choose)", highlight=False)
    scheme = spec.build(group_size)
    _check_alignment(source, shapes, quantized, scheme_name, alignment_unit(scheme))
    computed, method = None, "round-to-nearest (compressed-tensors qparams)"
    if calibrate is not None:
        family = family_for(config)
        computed, method = calibrate(scheme, spec.format, {family.module_tensor_name(n)[: -len(".weight")] for n in quantized})

    source_bytes = quant_bytes = 0
    with staged_folder("-o", out, overwrite=overwrite) as folder, progress_bar() as bar:
        task = bar.add_task(f"quantize {scheme_name}", total=len(shapes))
        writer = _ShardWriter(folder, max_shard_bytes)
        by_file: dict[str, list[str]] = {}
        for name, file in files.items():
            by_file.setdefault(file, []).append(name)
        for file in sorted(by_file):
            with RawSafetensors(source / file) as f:  # plain reads: mapped pages would count as resident memory
                for name in sorted(by_file[file]):
                    tensor = f.get_tensor(name)
                    if name in quantized:
                        module = name[: -len(".weight")]
                        source_bytes += tensor.numel() * tensor.element_size()
                        parts = computed(name) if computed is not None else None
                        if parts is None and computed is not None:
                            raise HeaprError(f"{source / file}: GPTQ computed no values for {name}; re-run, or quantize with --method rtn")
                        if parts is None:
                            parts = quantize_weight(tensor, scheme, spec.format)
                        elif [int(v) for v in parts.get("weight_shape", torch.tensor(parts.get("weight", tensor).shape))] != list(tensor.shape):
                            raise HeaprError(f"{source / file}: {name} {list(tensor.shape)} is not the weight GPTQ quantized; re-run the command")
                        for local, value in parts.items():
                            quant_bytes += value.numel() * value.element_size()
                            writer.add(f"{module}.{local}", value)
                    else:
                        writer.add(name, tensor)
                    bar.advance(task)
        writer.finish()
        qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format=spec.format, ignore=skipped,
                                     quantization_status=QuantizationStatus.COMPRESSED)
        saved = dict(config)
        saved["quantization_config"] = qconfig.model_dump(exclude_none=True, mode="json")
        record = {"scheme": scheme_name, "preset": spec.preset, "format": spec.format, "summary": spec.summary,
                  "group_size": scheme.weights.group_size, "strategy": str(getattr(scheme.weights.strategy, "value", scheme.weights.strategy)),
                  "method": method, "quantized_tensors": len(quantized),
                  "ignored_modules": len(skipped), "only_experts": bool(only_experts), "weight_bytes_before": source_bytes, "weight_bytes_after": quant_bytes,
                  "total_bytes": writer.total_bytes}
        if pruned:
            saved["heapr"] = {**saved["heapr"], "quantization": record}
        else:
            saved["heapr_quantization"] = record
        (folder / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        for item in sorted(source.iterdir()):
            if item.is_file() and any(fnmatch(item.name, pattern) for pattern in (*_TRAVELLING_FILES, *carry)):
                shutil.copy2(item, folder / item.name)
        _write_card(source, folder, record, out.name)
    return record


def _write_card(source: Path, folder: Path, record: dict, name: str) -> None:
    """Carry the source's model card (a pruned folder's says what was pruned) and add the quantization."""
    card = source / "README.md"
    text = card.read_text() if card.is_file() else f"# {name}\n"
    saved = 1 - record["weight_bytes_after"] / max(record["weight_bytes_before"], 1)
    text += (f"\n## Quantization\n\nQuantized by `heapr-serve quantize --scheme {record['scheme']}` "
             f"(compressed-tensors `{record['format']}`, {record['summary']}; {record['method']}).\n\n"
             "| | before | after |\n|---|---:|---:|\n"
             f"| quantized Linear weights | {record['weight_bytes_before']:,} B | {record['weight_bytes_after']:,} B (-{saved:.1%}) |\n"
             f"| checkpoint tensors | | {record['total_bytes']:,} B |\n\n"
             f"{record['ignored_modules']} Linear modules ({'everything but the routed experts' if record['only_experts'] else 'router gates, LM head'}) "
             "stay unquantized.\n")
    (folder / "README.md").write_text(text)
