"""Round-to-nearest quantization of one weight matrix into compressed-tensors' tensors.

The scales come from compressed-tensors' own `calculate_qparams` (min/max over each group, channel or
block, zero kept representable) and the packing from its compressors, so the bytes on disk are exactly
what llm-compressor's round-to-nearest would write for the same scheme; nothing here re-implements the
format. One tensor at a time, so any model size fits in memory.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy
from compressed_tensors.quantization.utils import calculate_qparams


def _qparams(weight: torch.Tensor, scheme: QuantizationScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of `weight` [out, in] for the scheme's strategy, in compressed-tensors'
    shapes: channel [out, 1], group [out, in / g], block [out / bo, in / bi], tensor [1]."""
    args = scheme.weights
    w = weight.to(torch.float32)
    out_f, in_f = w.shape
    if args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    elif args.strategy == QuantizationStrategy.GROUP:
        g = args.group_size
        grouped = w.reshape(out_f, in_f // g, g)
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    elif args.strategy == QuantizationStrategy.BLOCK:  # partial edge blocks, as compressed-tensors pads them
        bo, bi = args.block_structure
        po, pi = -(-out_f // bo) * bo, -(-in_f // bi) * bi
        w = torch.nn.functional.pad(w, (0, pi - in_f, 0, po - out_f))
        blocks = w.reshape(po // bo, bo, pi // bi, bi)
        lo, hi = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    elif args.strategy == QuantizationStrategy.TENSOR:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    else:  # pragma: no cover - the presets in schemes.py use only the strategies above
        raise ValueError(f"weight strategy {args.strategy} is not supported")
    scale, zero_point = calculate_qparams(lo, hi, args)
    return scale.to(weight.dtype if weight.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32), zero_point


def quantize_weight(weight: torch.Tensor, scheme: QuantizationScheme, fmt: str) -> dict[str, torch.Tensor]:
    """The compressed tensors of one Linear weight [out, in], keyed by their local names
    (`weight_packed`, `weight_scale`, `weight_shape`, `weight_zero_point` / `weight`, `weight_scale`)."""
    scale, zero_point = _qparams(weight, scheme)
    return pack_weight(weight, scale, zero_point, scheme, fmt)


def pack_weight(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: QuantizationScheme,
                fmt: str) -> dict[str, torch.Tensor]:
    """compressed-tensors' tensors of `weight` rounded onto the grid of `scale` / `zero_point` (for
    GPTQ, a weight already on that grid, so the rounding is exact)."""
    state = {"weight": weight, "weight_scale": scale}
    if not scheme.weights.symmetric:
        state["weight_zero_point"] = zero_point
    compressor = BaseCompressor.get_value_from_registry(fmt)
    return {k: v.contiguous() for k, v in compressor.compress(state, scheme).items()}


def dequantize_weight(tensors: dict[str, torch.Tensor], scheme: QuantizationScheme, fmt: str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight a quantized Linear stands for (compressed-tensors' own decompression)."""
    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = dict(tensors)
    if "weight_shape" in state:
        state["weight_shape"] = [int(v) for v in state["weight_shape"]]
    return compressor.decompress(state, scheme)["weight"].to(dtype)


def alignment_unit(scheme: QuantizationScheme) -> tuple[int, int]:
    """What the two dimensions of a weight [out, in] must be multiples of under this scheme: whole
    groups along the input; blocks may be partial at the edges (compressed-tensors pads them)."""
    args = scheme.weights
    if args.strategy == QuantizationStrategy.GROUP:
        return 1, int(args.group_size)
    return 1, 1  # channels and (edge-padded) blocks fit any shape
