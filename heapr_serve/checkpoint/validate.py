"""Validating pruned checkpoints: every loader calls `validate_checkpoint` first.

Stock vLLM loads a ragged checkpoint without error and serves garbage, so each expert tensor is checked
against the declared widths from the safetensors headers alone (no tensor data is read, so a 100 GB
checkpoint is checked in a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from heapr_serve.checkpoint.format import (FUSED_EXPERTS_TENSOR, PER_EXPERT_TENSOR, dense_expert_width, open_safetensors,
                                           parse_widths, read_config, safetensors_files)
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

    @property
    def heapr(self) -> dict:
        return self.config["heapr"]



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
    widths = parse_widths(config, config_file)
    dense = int(config["heapr"].get("dense_width") or dense_expert_width(config))
    hidden = int(config["hidden_size"])
    files = safetensors_files(path)

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in sorted(set(files.values())):
        with open_safetensors(path / file) as f:
            for name in f.keys():
                shapes[name] = (tuple(f.get_slice(name).get_shape()), file)

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
        if layer not in widths:
            raise HeaprError(f"{path / file}: tensor {name} is for layer {layer}, which heapr.expert_widths does not list")
        width = widths[layer][expert] if expert < len(widths[layer]) else None
        if width is None:
            raise HeaprError(f"{path / file}: tensor {name} names expert {expert}, beyond the {len(widths[layer])} declared")
        if width == 0:
            raise HeaprError(f"{path / file}: tensor {name} exists but expert {expert} of layer {layer} is declared width 0")
        expected = (hidden, width) if proj == family.disk_projs[2] else (width, hidden)
        if shape != expected:
            raise HeaprError(
                f"{path / file}: tensor {name} has shape {list(shape)} but heapr.expert_widths declares width "
                f"{width} (expected {list(expected)}); the folder is inconsistent, re-run `heapr-serve apply`"
            )
        seen_expert_tensors.add(name)

    prefix = prefix or "model.layers."
    for layer, layer_widths in widths.items():
        for expert, width in enumerate(layer_widths):
            if width == 0:
                continue
            for proj in range(3):
                name = family.expert_tensor_name(prefix, layer, expert, proj)
                if name not in seen_expert_tensors:
                    raise HeaprError(f"{path}: tensor {name} is missing (expert {expert} of layer {layer} is declared width {width})")
    return PrunedCheckpoint(path, config, family, widths, dense, hidden, files)
