"""Validating pruned checkpoints: every loader calls `validate_checkpoint` first.

Stock vLLM loads a ragged checkpoint without error and serves garbage, so each expert tensor is checked
against the declared widths from the safetensors headers alone (no tensor data is read, so a 100 GB
checkpoint is checked in a second).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from heapr_serve.checkpoint.format import (GPT_OSS_EXPERTS_TENSOR, PER_EXPERT_BIAS, FUSED_EXPERTS_TENSOR, PER_EXPERT_TENSOR, SCALE_SUFFIX, dense_expert_width, extra_layers,
                                           num_routed_experts, open_safetensors, parse_kept_whole, parse_widths, read_config,
                                           safetensors_files, tensor_layer)
from heapr_serve.errors import HeaprError
from heapr_serve.families import Family, family_for


@dataclass
class PrunedCheckpoint:
    path: Path
    config: dict
    family: Family
    widths: dict[int, list[int]]  # decoder layer -> width of each routed expert
    dense_width: int
    hidden_size: int
    tensor_files: dict[str, str]  # tensor name -> file name
    kept_whole: dict[int, str]  # decoder layer -> why its experts are at the dense width (the MTP layer)
    num_hidden_layers: int  # tensors of layers from here on (MTP) are not part of the model's forward

    @property
    def heapr(self) -> dict:
        return self.config["heapr"]



# `<module>.weight_packed` and the other tensors compressed-tensors stores a quantized Linear as
QUANT_PART = re.compile(r"^(?P<base>.+)\.(?P<part>weight_packed|weight_scale|weight_shape|weight_zero_point|weight)$")
_DTYPES = {"I32": torch.int32, "I64": torch.int64, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16,
           "F16": torch.float16, "F32": torch.float32}


def _check_quantized(path: Path, name: str, found: dict, spec, shape: tuple[int, int], width: int) -> None:
    """Every quantized part of one expert weight [out, in] is present, with the shape and dtype the
    scheme gives at the declared width (scales and zero points per group or block included)."""
    module = name[: -len(".weight")]
    expected = spec.expected(*shape)
    for part, (want, dtypes) in expected.items():
        if part not in found:
            raise HeaprError(f"{path}: tensor {module}.{part} is missing (expert of declared width {width}, scheme "
                             f"{spec.format}); re-run `heapr-serve quantize`")
        got, dtype, file = found[part]
        if got != want:
            raise HeaprError(f"{path / file}: tensor {module}.{part} has shape {list(got)} but heapr.expert_widths declares width "
                             f"{width} (expected {list(want)} for {spec.format} {spec.strategy}"
                             f"{f' group {spec.group_size}' if spec.strategy == 'group' else ''}); re-run `heapr-serve quantize`")
        torch_dtype = _DTYPES.get(dtype)
        if (dtypes is not None and torch_dtype not in dtypes) or (dtypes is None and not (torch_dtype and torch_dtype.is_floating_point)):
            raise HeaprError(f"{path / file}: tensor {module}.{part} is {dtype}, not what {spec.format} stores; re-run `heapr-serve quantize`")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise HeaprError(f"{path / found[extra[0]][2]}: tensor {module}.{extra[0]} is not part of the {spec.format} scheme in "
                         "config.json; the folder is inconsistent, re-run `heapr-serve quantize`")


def validate_checkpoint(path: str | Path) -> PrunedCheckpoint:
    """Check a pruned folder end to end; raise HeaprError naming the first problem and its fix."""
    path = Path(path)
    if not path.is_dir():
        raise HeaprError(f"{path}: not a folder; pass the output folder of `heapr-serve compress`")
    config = read_config(path)
    config_file = path / "config.json"
    if "heapr" not in config:
        raise HeaprError(f"{config_file}: no `heapr` section, so this is not a pruned checkpoint")
    family = family_for(config)
    archs = config.get("architectures") or []
    if archs != [family.pruned_architecture]:
        raise HeaprError(f"{config_file}: architectures is {archs}, but a pruned {family.model_type} folder declares "
                         f"[{family.pruned_architecture!r}] (vLLM would read its ragged experts with the stock model, wrongly); "
                         "re-create it with `heapr-serve compress` or HEAPrPruningModifier")
    widths = parse_widths(config, config_file)
    kept_whole = parse_kept_whole(config, config_file, widths)
    dense = int(config["heapr"].get("dense_width") or dense_expert_width(config))
    hidden = int(config["hidden_size"])
    spec = None
    if config.get("quantization_config"):  # heapr-serve quantize's or llm-compressor's: checked part by part below
        from heapr_serve.quantize.layout import QuantSpec

        spec = QuantSpec.from_config(config["quantization_config"], str(config_file))
    files = safetensors_files(path)

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    parts: dict[str, dict[str, tuple[tuple[int, ...], str, str]]] = {}  # expert weight -> quantized part -> (shape, dtype, file)
    for file in sorted(set(files.values())):
        with open_safetensors(path / file) as f:
            for name in f.keys():
                piece = f.get_slice(name)
                if name.endswith(SCALE_SUFFIX) or (spec is None and piece.get_dtype().startswith("F8")):
                    raise HeaprError(f"{path / file}: tensor {name} is FP8 data or an FP8 scale, but this pruned checkpoint "
                                     "declares no quantization; re-create the folder with `heapr-serve compress`")
                q = QUANT_PART.match(name) if spec is not None else None
                if q and PER_EXPERT_TENSOR.match(q["base"] + ".weight"):
                    parts.setdefault(q["base"] + ".weight", {})[q["part"]] = (tuple(piece.get_shape()), piece.get_dtype(), file)
                    name = q["base"] + ".weight"  # checked below as the expert weight it stands for
                    if name in shapes:
                        continue
                    shapes[name] = (None, file)
                    continue
                shapes[name] = (tuple(piece.get_shape()), file)
    extra = extra_layers(config, shapes, path, family.extra_layers_key)
    undeclared = sorted(set(extra) - set(kept_whole))
    if undeclared:
        layer = undeclared[0]
        name = next(n for n in shapes if tensor_layer(n) == layer)
        raise HeaprError(f"{path / shapes[name][1]}: tensor {name} is for layer {layer} (past num_hidden_layers), which "
                         "heapr.kept_whole_layers does not list; re-create the folder with `heapr-serve compress`")

    seen_expert_tensors = set()
    prefix = None
    for name, (shape, file) in shapes.items():
        if FUSED_EXPERTS_TENSOR.match(name):
            raise HeaprError(f"{path / file}: tensor {name} is a fused expert stack; pruned checkpoints hold per-expert tensors")
        m = PER_EXPERT_TENSOR.match(name)
        if not m:
            continue
        layer, expert, proj = int(m["layer"]), int(m["expert"]), m["proj"]
        prefix = m["prefix"]
        if proj not in family.disk_projs or m["block"] != family.disk_block:
            raise HeaprError(f"{path / file}: unexpected expert tensor {name} for a {family.model_type} model")
        if layer in kept_whole:
            expected = (hidden, dense) if proj == family.disk_projs[2] else (dense, hidden)
            if spec is not None and shape is None and expert < num_routed_experts(config):
                _check_quantized(path, name, parts.get(name, {}), spec, expected, dense)
            elif expert >= num_routed_experts(config) or shape != expected:
                raise HeaprError(f"{path / file}: tensor {name} has shape {list(shape)} but layer {layer} is kept whole "
                                 f"({kept_whole[layer]}), so its experts are at the dense width (expected {list(expected)})")
            seen_expert_tensors.add(name)
            continue
        if layer not in widths:
            raise HeaprError(f"{path / file}: tensor {name} is for layer {layer}, which heapr.expert_widths does not list")
        width = widths[layer][expert] if expert < len(widths[layer]) else None
        if width is None:
            raise HeaprError(f"{path / file}: tensor {name} names expert {expert}, beyond the {len(widths[layer])} declared")
        if width == 0:
            raise HeaprError(f"{path / file}: tensor {name} exists but expert {expert} of layer {layer} is declared width 0")
        expected = (hidden, width) if proj == family.disk_projs[2] else (width, hidden)
        if spec is not None:
            _check_quantized(path, name, parts.get(name, {}), spec, expected, width)
        elif shape is None:
            raise HeaprError(f"{path / file}: tensor {name} is stored quantized, but config.json has no quantization_config; "
                             "re-run `heapr-serve quantize`")
        elif shape != expected:
            raise HeaprError(
                f"{path / file}: tensor {name} has shape {list(shape)} but heapr.expert_widths declares width "
                f"{width} (expected {list(expected)}); the folder is inconsistent, re-run `heapr-serve apply`"
            )
        seen_expert_tensors.add(name)

    prefix = prefix or "model.layers."
    if family.expert_layout == "gpt_oss":
        _check_expert_biases(path, shapes, widths, hidden, prefix)
    for layer, layer_widths in widths.items():
        for expert, width in enumerate(layer_widths):
            if width == 0:
                continue
            for proj in range(3):
                name = family.expert_tensor_name(prefix, layer, expert, proj)
                if name not in seen_expert_tensors:
                    raise HeaprError(f"{path}: tensor {name} is missing (expert {expert} of layer {layer} is declared width {width})")
    for layer, reason in kept_whole.items():
        names = [family.expert_tensor_name(prefix, layer, e, p) for e in range(num_routed_experts(config)) for p in range(3)]
        if layer not in extra:
            raise HeaprError(f"{config_file}: heapr.kept_whole_layers lists layer {layer} ({reason}), which has no tensors")
        if any(n in seen_expert_tensors for n in names):  # a kept-whole MoE layer has every expert, whole
            missing = next((n for n in names if n not in seen_expert_tensors), None)
            if missing:
                raise HeaprError(f"{path}: tensor {missing} is missing (layer {layer} is kept whole: {reason})")
    return PrunedCheckpoint(path, config, family, widths, dense, hidden, files, kept_whole, int(config["num_hidden_layers"]))


def _check_expert_biases(path: Path, shapes: dict, widths: dict[int, list[int]], hidden: int, prefix: str) -> None:
    """gpt-oss: gate/up biases [width] for every expert with neurons, a down bias [hidden] for every
    expert (width 0 too: it still adds it), and no fused stacks or other expert biases."""
    for name, (shape, file) in shapes.items():
        if GPT_OSS_EXPERTS_TENSOR.match(name):
            raise HeaprError(f"{path / file}: tensor {name} is a fused expert stack; pruned checkpoints hold per-expert tensors")
        m = PER_EXPERT_BIAS.match(name)
        if not m:
            continue
        layer, expert = int(m["layer"]), int(m["expert"])
        layer_widths = widths.get(layer, [])
        width = layer_widths[expert] if expert < len(layer_widths) else None
        expected = {"gate_proj": (width,), "up_proj": (width,), "down_proj": (hidden,)}.get(m["proj"])
        if width is None or expected is None or (width == 0 and m["proj"] != "down_proj"):
            raise HeaprError(f"{path / file}: unexpected expert bias {name} for the declared widths; re-run `heapr-serve apply`")
        if shape != expected:
            raise HeaprError(f"{path / file}: tensor {name} has shape {list(shape)}, expected {list(expected)} "
                             f"(heapr.expert_widths declares width {width}); re-run `heapr-serve apply`")
    for layer, layer_widths in widths.items():
        for expert, width in enumerate(layer_widths):
            for proj in ("gate_proj", "up_proj", "down_proj") if width else ("down_proj",):
                name = f"{prefix}{layer}.mlp.experts.{expert}.{proj}.bias"
                if name not in shapes:
                    raise HeaprError(f"{path}: tensor {name} is missing (gpt-oss experts keep their biases)")
