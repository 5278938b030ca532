"""Test references for quantized folders: the float model a quantized folder stands for."""

from __future__ import annotations

from pathlib import Path

import torch

from heapr_serve.quantize.dequantize import write_dequantized


def dequantized_copy(folder: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """`folder` (written by `heapr-serve quantize`) with every quantized Linear replaced by the float
    weight compressed-tensors' own decompressor gives, and no quantization_config: the float model
    the quantized one computes, for transformers or stock vLLM to serve (the same code `eval` uses)."""
    return write_dequantized(folder, out, dtype)
