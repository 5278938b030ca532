"""Finding and loading models: a local folder or a hub id, dense or pruned, on the chosen device."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from heapr_serve.errors import HeaprError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(model: str) -> Path:
    """A local folder as is; anything else is treated as a hub id and downloaded (where reachable)."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HeaprError(f"{model}: the folder has no config.json; pass a Hugging Face model folder")
        return path
    if path.exists():
        raise HeaprError(f"{model}: is a file; pass a model folder or a hub id")
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise HeaprError(f"{model}: no such folder; pass a local model folder or a hub id like org/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as err:  # network, auth, missing repo: one line, not a traceback
        raise HeaprError(f"{model}: not a local folder and could not be fetched from the hub ({type(err).__name__}); download it first and pass the folder") from None


def model_reference(model: str, path: Path) -> str:
    """How a source is recorded (scores metadata, heapr.source_model) so that `apply` finds it again
    from any working directory: a local folder by absolute path, a hub download by its hub id."""
    return os.path.abspath(model) if Path(model).is_dir() else model


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HeaprError(f"--device {device}: no CUDA GPU is visible; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise HeaprError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None


def pick_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise HeaprError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(path: Path, dtype: torch.dtype, device: torch.device):
    """Dense or pruned (through our transformers patch), in eval mode on `device`. An FP8
    block-quantised source (which transformers cannot load on CPU) or an MXFP4 one (gpt-oss; transformers
    would fetch Triton kernels or dequantise on its own terms) is read dequantised to `dtype`."""
    import heapr_serve  # noqa: F401  (installs the pruned-checkpoint patch)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from heapr_serve.checkpoint.format import is_pruned, read_config
    from heapr_serve.checkpoint.source import fp8_block_size, is_mxfp4, load_dense

    logging.disable_progress_bar()
    from heapr_serve.quantize.dequantize import dequantized_folder, is_quantized

    if is_quantized(Path(path)):  # compressed-tensors (heapr-serve quantize): the float model it stands for
        with dequantized_folder(Path(path), dtype if dtype.is_floating_point else torch.bfloat16) as plain:
            return load_model(plain, dtype, device)
    if not is_pruned(Path(path)):
        config, config_file = read_config(Path(path)), Path(path) / "config.json"
        if fp8_block_size(config, config_file) is not None or is_mxfp4(config, config_file):
            return load_dense(Path(path), dtype, device).eval()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise HeaprError(f"{path}: could not load its tokenizer ({type(err).__name__}); the folder needs tokenizer files") from None
