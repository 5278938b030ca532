"""The checkpoint format (docs/checkpoint_format.md): tensor names, the `heapr` config section, and
reading checkpoint folders (config, safetensors index, headers) with one-line errors."""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from heapr_serve.errors import HeaprError

FORMAT_VERSION = 1

# Routed-expert tensor names, per expert (`...layers.3.mlp.experts.7.gate_proj.weight`) or fused
# (`...layers.3.mlp.experts.gate_up_proj`); shared by the validator, the writer and the baselines. Not
# Qwen3-Next / Qwen3.5's separate MTP module (`mtp.layers.0.mlp.experts...`): its layer 0 is not the
# model's layer 0, and it is kept whole like every other tensor outside the decoder's MoE layers.
PER_EXPERT_TENSOR = re.compile(r"^(?P<prefix>(?!mtp\.).*layers\.)(?P<layer>\d+)\.(?P<block>[a-z_]+)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
FUSED_EXPERTS_TENSOR = re.compile(r"^(?P<prefix>(?!mtp\.).*layers\.)(?P<layer>\d+)\.(?P<block>[a-z_]+)\.experts\.(?P<proj>gate_up_proj|down_proj)$")
# gpt-oss's stacks on disk: gate_up_proj [E, H, 2I] (interleaved), down_proj [E, I, H] and their biases
GPT_OSS_EXPERTS_TENSOR = re.compile(r"^(?P<prefix>(?!mtp\.).*layers\.)(?P<layer>\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)(?P<bias>_bias)?$")
# per-expert biases of a pruned gpt-oss checkpoint (`...experts.7.gate_proj.bias`)
PER_EXPERT_BIAS = re.compile(r"^(?P<prefix>.*layers\.)(?P<layer>\d+)\.(?P<block>[a-z_]+)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.bias$")
# The decoder layer a tensor belongs to (`model.layers.61.enorm.weight` -> 61), for any tensor.
LAYER_OF_TENSOR = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.")
# FP8 block scales (DeepSeek-V3, Qwen3-FP8): `<weight name>_scale_inv` beside each quantised weight.
SCALE_SUFFIX = "_scale_inv"
# MXFP4 expert stacks (gpt-oss as released): `<stack>_blocks` (uint8, two e2m1 values a byte) and
# `<stack>_scales` (uint8 e8m0, one per 32 values) in place of the stack `<stack>`
MXFP4_TENSOR = re.compile(r"^(?P<stack>(?!mtp\.).*layers\.\d+\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj))_(?P<part>blocks|scales)$")
MTP_REASON = "MTP (num_nextn_predict_layers), not calibrated"


@contextmanager
def open_safetensors(file: Path, device: str = "cpu"):
    """`safe_open` whose failures (truncated or corrupt file) become one-line HeaprErrors."""
    try:
        with safe_open(file, "pt", device=device) as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise HeaprError(f"{file}: not a readable safetensors file ({err}); re-download or re-create it") from None


def read_config(path: Path) -> dict:
    """config.json as the language model sees it (`text_view`); write configs from the file itself."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise HeaprError(f"{path}: no config.json; pass a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise HeaprError(f"{config_file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(config, dict):
        raise HeaprError(f"{config_file}: not a JSON object")
    return text_view(config)


def text_view(config: dict) -> dict:
    """A vision-language config (Qwen3.5-MoE: the language model's fields under `text_config`) with
    those fields at the top, beside the top-level ones (model_type, architectures, heapr), so the
    language model's sizes read the same for every family. Other configs are returned as they are."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return config
    return {**config, **{k: v for k, v in text.items() if k != "model_type"}}


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
    config = text_view(config)
    return int(_config_value(config, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"))


def dense_expert_width(config: dict) -> int:
    config = text_view(config)
    return int(_config_value(config, "moe_intermediate_size", "intermediate_size"))


def parse_widths(config: dict, config_file: Path | str) -> dict[int, list[int]]:
    """Decoder layer -> routed-expert widths from the `heapr` section, checked (one-line errors)."""
    heapr = config.get("heapr")
    if not isinstance(heapr, dict):
        raise HeaprError(f"{config_file}: no `heapr` section, so this is not a pruned checkpoint; re-create the folder with `heapr-serve compress`")
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




def tensor_layer(name: str) -> int | None:
    m = LAYER_OF_TENSOR.search(name)
    return int(m["layer"]) if m else None


def extra_layers(config: dict, names, where: Path | str, extra_key: str | None) -> list[int]:
    """Decoder layers past `num_hidden_layers` that have tensors in `names` (DeepSeek-V3's MTP layer
    `model.layers.61.*`), checked against the config's count of them (`extra_key`,
    e.g. num_nextn_predict_layers): a tensor of a layer the config does not declare is refused."""
    base = int(_config_value(text_view(config), "num_hidden_layers"))
    allowed = int(config.get(extra_key) or 0) if extra_key else 0
    found = set()
    for name in names:
        layer = tensor_layer(name)
        if layer is None or layer < base:
            continue
        if layer >= base + allowed:
            declared = f" and {extra_key} {allowed}" if extra_key else ""
            raise HeaprError(f"{where}: tensor {name} is for layer {layer}, but config.json declares num_hidden_layers {base}{declared}; "
                             "remove the stray tensors or fix config.json")
        found.add(layer)
    return sorted(found)


def parse_kept_whole(config: dict, config_file: Path | str, widths: dict[int, list[int]]) -> dict[int, str]:
    """Layer -> reason, from `heapr.kept_whole_layers`: layers whose experts are stored at the dense width
    (the MTP layer, which calibration never runs)."""
    raw = config.get("heapr", {}).get("kept_whole_layers") or {}
    if not isinstance(raw, dict):
        raise HeaprError(f"{config_file}: heapr.kept_whole_layers must map layer indices to reasons")
    kept = {}
    for layer, reason in raw.items():
        if not str(layer).isdigit():
            raise HeaprError(f"{config_file}: heapr.kept_whole_layers has key {layer!r}, not a layer index")
        if int(layer) in widths:
            raise HeaprError(f"{config_file}: layer {layer} is both in heapr.expert_widths and heapr.kept_whole_layers")
        kept[int(layer)] = str(reason)
    return dict(sorted(kept.items()))


def source_fingerprint(source: Path) -> str:
    """A cheap identity of a checkpoint's weights (size, head and tail of every shard), so `apply`
    can tell that saved scores belong to these weights and not to a retrained or replaced model."""
    digest = hashlib.sha256()
    for file in sorted(set(safetensors_files(source).values())):
        path = Path(source) / file
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            f.seek(max(0, size - (1 << 16)))
            tail = f.read(1 << 16)
        digest.update(f"{file}:{size}:".encode() + head + tail)
    return digest.hexdigest()


def count_source_params(source: Path) -> int:
    """Parameters of a checkpoint, from the safetensors headers alone (FP8 block and MXFP4 scales are
    not parameters and are not counted; an MXFP4 byte holds two; a compressed-tensors weight counts
    the weight it stands for, from its `weight_shape`, and its scales and zero points do not)."""
    total = 0
    for file in sorted(set(safetensors_files(source).values())):
        with open_safetensors(Path(source) / file) as f:
            for name in f.keys():
                mxfp4 = MXFP4_TENSOR.match(name)
                if name.endswith((".weight_scale", ".weight_zero_point", ".weight_packed")):
                    continue
                if name.endswith(".weight_shape"):
                    total += torch.Size([int(v) for v in f.get_tensor(name).tolist()]).numel()
                elif not name.endswith(SCALE_SUFFIX) and not (mxfp4 and mxfp4["part"] == "scales"):
                    total += torch.Size(f.get_slice(name).get_shape()).numel() * (2 if mxfp4 else 1)
    return total
