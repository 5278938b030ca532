"""Test references for quantized folders: the float model a quantized folder stands for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compressed_tensors.quantization import QuantizationConfig

from heapr_serve.quantize.rtn import dequantize_weight

_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def dequantized_copy(folder: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """`folder` (written by `heapr-serve quantize`) with every quantized Linear replaced by the float
    weight compressed-tensors' own decompressor gives, and no quantization_config: the float model
    the quantized one computes, for transformers or stock vLLM to serve."""
    folder, out = Path(folder), Path(out)
    config = json.loads((folder / "config.json").read_text())
    (config.get("heapr") or {}).pop("quantization", None) or config.pop("heapr_quantization")
    qconfig = QuantizationConfig.model_validate(config.pop("quantization_config"))
    scheme = qconfig.config_groups["group_0"]
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(f))
    modules = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_scale")}
    new = {n: t for n, t in tensors.items() if not any(n == f"{m}.{p}" for m in modules for p in (*_PARTS, "weight"))}
    for m in modules:
        parts = {p: tensors[f"{m}.{p}"] for p in (*_PARTS, "weight") if f"{m}.{p}" in tensors}
        new[f"{m}.weight"] = dequantize_weight(parts, scheme, qconfig.format, dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in folder.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    return out
