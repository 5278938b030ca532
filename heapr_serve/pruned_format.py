"""Reading and validating pruned checkpoints (docs/checkpoint_format.md).

Every loader calls `validate_checkpoint` first: stock vLLM loads a ragged checkpoint without error and
serves garbage, so each expert tensor is checked against the declared widths from the safetensors
headers alone (no tensor data is read, so a 100 GB checkpoint is checked in a second).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from contextlib import contextmanager

from safetensors import SafetensorError, safe_open

from heapr_serve.errors import HeaprError
from heapr_serve.families import Family, family_for

FORMAT_VERSION = 1

# Routed-expert tensor names, per expert (`...layers.3.mlp.experts.7.gate_proj.weight`) or fused
# (`...layers.3.mlp.experts.gate_up_proj`); shared by the validator, the writer and the baselines.
PER_EXPERT_TENSOR = re.compile(r"^(?P<prefix>.*layers\.)(?P<layer>\d+)\.(?P<block>[a-z_]+)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
FUSED_EXPERTS_TENSOR = re.compile(r"^(?P<prefix>.*layers\.)(?P<layer>\d+)\.(?P<block>[a-z_]+)\.experts\.(?P<proj>gate_up_proj|down_proj)$")


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


@contextmanager
def open_safetensors(file: Path, device: str = "cpu"):
    """`safe_open` whose failures (truncated or corrupt file) become one-line HeaprErrors."""
    try:
        with safe_open(file, "pt", device=device) as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise HeaprError(f"{file}: not a readable safetensors file ({err}); re-download or re-create it") from None


def read_config(path: Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise HeaprError(f"{path}: no config.json; pass a Hugging Face model folder")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise HeaprError(f"{config_file}: not valid JSON ({err.msg} at line {err.lineno})") from None


def is_pruned(path: Path) -> bool:
    """True when `path` is a local folder whose config.json carries a `heapr` section."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return "heapr" in json.loads(config_file.read_text())
    except json.JSONDecodeError:
        return False


def safetensors_files(path: Path) -> dict[str, str]:
    """Tensor name -> file, from the index when there is one, else from the single file."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        for file in sorted(set(weight_map.values())):
            if not (path / file).is_file():
                raise HeaprError(f"{index}: names {file}, which is missing from {path}")
        return dict(weight_map)
    single = path / "model.safetensors"
    if single.is_file():
        with open_safetensors(single) as f:
            return {k: single.name for k in f.keys()}
    raise HeaprError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)")


def _config_value(config: dict, *names):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise HeaprError(f"config.json lacks {' / '.join(names)}")


def num_routed_experts(config: dict) -> int:
    return int(_config_value(config, "num_experts", "num_local_experts", "n_routed_experts"))


def dense_expert_width(config: dict) -> int:
    return int(_config_value(config, "moe_intermediate_size", "intermediate_size"))


def _parse_widths(config: dict, config_file: Path) -> dict[int, list[int]]:
    heapr = config["heapr"]
    if heapr.get("format_version") != FORMAT_VERSION:
        raise HeaprError(
            f"{config_file}: heapr.format_version is {heapr.get('format_version')!r}, this heapr-serve reads "
            f"version {FORMAT_VERSION}; re-run `heapr-serve apply` or upgrade heapr-serve"
        )
    raw = heapr.get("expert_widths")
    if not isinstance(raw, dict) or not raw:
        raise HeaprError(f"{config_file}: heapr.expert_widths is missing or empty; re-create the folder with `heapr-serve compress`")
    num_experts = num_routed_experts(config)
    dense = int(heapr.get("dense_width") or dense_expert_width(config))
    widths = {}
    for layer, values in raw.items():
        if not str(layer).isdigit() or not isinstance(values, list) or len(values) != num_experts:
            raise HeaprError(f"{config_file}: heapr.expert_widths[{layer!r}] must list {num_experts} widths, one per routed expert")
        if any(not isinstance(w, int) or w < 0 or w > dense for w in values):
            raise HeaprError(f"{config_file}: heapr.expert_widths[{layer!r}] has a width outside 0..{dense}")
        widths[int(layer)] = values
    return dict(sorted(widths.items()))


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
    widths = _parse_widths(config, config_file)
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
