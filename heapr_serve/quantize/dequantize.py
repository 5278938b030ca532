"""A quantized folder as the float model it stands for: what `eval` measures in-process.

transformers cannot load a *pruned* compressed-tensors folder (its experts are ragged), and for a dense
one its compressed-tensors integration would measure its own kernels rather than the values on disk.
Here every quantized Linear is decompressed with compressed-tensors' own code
(heapr_serve.quantize.rtn.dequantize_weight) into a scratch copy of the folder without a
`quantization_config`, which the normal loaders read. The served model computes with the same values
(the pruned layer's exact-dequantization path, and the quantized kernels up to their arithmetic).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from heapr_serve.checkpoint.format import open_safetensors, read_config, safetensors_files

_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight")


def is_quantized(folder: Path) -> bool:
    """Written by `heapr-serve quantize` (compressed-tensors); FP8 / MXFP4 sources load their own way."""
    return (read_config(Path(folder)).get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


@contextlib.contextmanager
def dequantized_folder(folder: Path, dtype: torch.dtype = torch.bfloat16):
    """Yield a scratch folder holding `folder` with every quantized weight decompressed to `dtype`."""
    with tempfile.TemporaryDirectory(prefix="heapr-dequantized-") as tmp:
        yield write_dequantized(folder, Path(tmp), dtype)


def write_dequantized(folder: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """`folder` into `out` with every quantized Linear decompressed to `dtype`, and neither the
    `quantization_config` nor heapr-serve's quantization record: the float model it stands for."""
    from compressed_tensors.quantization import QuantizationConfig  # only for a quantized folder: ~8 s to import

    from heapr_serve.quantize.rtn import dequantize_weight

    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = read_config(folder)
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    group = next(iter(qconfig.config_groups.values()))
    fmt = str(getattr(group.format or qconfig.format, "value", group.format or qconfig.format))
    index = {}
    for file in sorted(set(safetensors_files(folder).values())):
        tensors, modules = {}, {}
        with open_safetensors(folder / file) as f:
            names = set(f.keys())
            for name in names:
                module, _, part = name.rpartition(".")
                if part in _PARTS and f"{module}.weight_scale" in names:
                    modules.setdefault(module, {})[part] = f.get_tensor(name)
                else:
                    tensors[name] = f.get_tensor(name)
        for module, parts in modules.items():
            tensors[f"{module}.weight"] = dequantize_weight(parts, group, fmt, dtype)
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        index.update({name: file for name in tensors})
    saved = {k: v for k, v in config.items() if k != "quantization_config"}
    saved.pop("heapr_quantization", None)
    if "heapr" in saved:
        saved["heapr"] = {k: v for k, v in saved["heapr"].items() if k != "quantization"}
    for key in ("dtype", "torch_dtype"):
        if key in saved:
            saved[key] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=2))
    for item in folder.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(item, out / item.name)
    return out
