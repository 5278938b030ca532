"""Quantized dense sources, read as the float model they stand for: FP8 block-quantised weights
(DeepSeek-V3's `weight_scale_inv`, Qwen3-FP8) and gpt-oss's MXFP4 expert stacks as released.

What the config declares is checked (only these two, and only in the layouts their families ship),
their safetensors headers are checked against it before any calibration, and their tensors are
dequantised as they are read (heapr_serve.checkpoint.source)."""

from __future__ import annotations

from pathlib import Path

import torch

from heapr_serve.checkpoint.format import MXFP4_TENSOR, SCALE_SUFFIX, open_safetensors
from heapr_serve.errors import HeaprError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_block_size(config: dict, config_file: Path | str = "config.json") -> tuple[int, int] | None:
    """(rows, cols) of the source's FP8 weight blocks, or None when it is not quantised; any other
    quantisation, or FP8 that is not block-quantised with dynamic activation scales, is refused."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower() if isinstance(q, dict) else ""
    if method == "mxfp4":  # gpt-oss as released: its expert stacks, read dequantised (is_mxfp4)
        is_mxfp4(config, config_file)
        return None
    if method != "fp8":
        raise HeaprError(f"{config_file}: quantization_config.quant_method {method or '?'!r} is not supported; pass the "
                         "unquantised checkpoint (or a block-quantised FP8 one, DeepSeek-V3 / Qwen3-FP8 style)")
    block = q.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise HeaprError(f"{config_file}: quantization_config is fp8 without a valid weight_block_size (got {block!r}); "
                         "only block-quantised FP8 sources (DeepSeek-V3 style, e.g. [128, 128]) are supported")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise HeaprError(f"{config_file}: quantization_config.activation_scheme is {scheme!r}; only dynamic activation "
                         "scaling (no stored input scales) is supported for FP8 sources")
    return int(block[0]), int(block[1])


def is_mxfp4(config: dict, config_file: Path | str = "config.json") -> bool:
    """Whether the source is MXFP4 as gpt-oss ships it (expert stacks only; the rest bfloat16). The
    layout read is gpt-oss's, so any other family declaring MXFP4 is refused."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or str(q.get("quant_method", "")).lower() != "mxfp4":
        return False
    if config.get("model_type") != "gpt_oss":
        raise HeaprError(f"{config_file}: quantization_config.quant_method 'mxfp4' is read for gpt-oss only (its expert "
                         f"stacks), not model_type {config.get('model_type')!r}; pass the unquantised checkpoint")
    return True


MXFP4_GROUP = 32  # values per e8m0 scale: 16 bytes of two e2m1 nibbles


def mxfp4_expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The released blocks shapes per stack, from config.json: gate_up [E, 2I, H/32, 16] (gate/up
    interleaved along 2I), down [E, H, I/32, 16]; scales are the same without the last axis."""
    experts, hidden, width = (int(config[k]) for k in ("num_local_experts", "hidden_size", "intermediate_size"))
    return {"gate_up_proj": (experts, 2 * width, hidden // MXFP4_GROUP, 16), "down_proj": (experts, hidden, width // MXFP4_GROUP, 16)}


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                     name: str = "experts.gate_up_proj") -> torch.Tensor:
    """transformers' own MXFP4 dequantisation (integrations/mxfp4.py `convert_moe_packed_tensors`,
    CPU-safe): e2m1 nibbles, low nibble first, times 2^(scale - 127), the last two axes swapped, so
    gate_up [E, 2I, H/32, 16] -> [E, H, 2I] and down [E, H, I/32, 16] -> [E, I, H] as its modules hold
    them. Exact in float32 and bfloat16 (same exponent range); other dtypes are cast from float32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != 16 \
            or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise HeaprError(f"{name}_blocks {blocks.dtype} {list(blocks.shape)} and {name}_scales {scales.dtype} {list(scales.shape)} "
                         "are not MXFP4 (uint8 blocks [E, R, G, 16] with uint8 scales [E, R, G])")
    exact = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    # chunks of 2^20 rows bound the int32 index temporaries to 64 MiB
    return convert_moe_packed_tensors(blocks, scales, dtype=exact, rows_per_chunk=1 << 20).to(dtype)


def check_scale_shape(weight_shape, scale_shape, block: tuple[int, int], name: str) -> None:
    """A block scale has one entry per (block rows x block cols) tile, partial edge tiles included."""
    *lead, rows, cols = weight_shape
    expected = (*lead, -(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_shape) != expected:
        raise HeaprError(f"{name}{SCALE_SUFFIX} has shape {list(scale_shape)}, but {name} {list(weight_shape)} in "
                         f"{block[0]}x{block[1]} blocks needs {list(expected)}; the checkpoint's scales do not match its weights")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "weight") -> torch.Tensor:
    """W = W_fp8 * scale per (block rows x block cols) tile, in float32 (partial edge tiles included)."""
    rows, cols = weight.shape[-2:]
    check_scale_shape(tuple(weight.shape), tuple(scale_inv.shape), block, name)
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.float() * scale


def check_mxfp4_headers(path: Path, config: dict, files: dict[str, str]) -> None:
    """Every MXFP4 stack has uint8 blocks and scales of the released shapes for config.json's sizes
    (safetensors headers only), so a broken checkpoint is refused before any calibration."""
    sizes = {k: config.get(k) for k in ("num_local_experts", "hidden_size", "intermediate_size")}
    blocked = (sizes["hidden_size"], sizes["intermediate_size"])
    if not all(isinstance(v, int) and v > 0 for v in sizes.values()) or any(v % MXFP4_GROUP for v in blocked):
        raise HeaprError(f"{path / 'config.json'}: an MXFP4 source needs num_local_experts, and hidden_size and "
                         f"intermediate_size multiples of {MXFP4_GROUP} (got {sizes}); the config does not match the checkpoint")
    expected = mxfp4_expected_shapes(config)
    parts: dict[str, dict[str, tuple]] = {}
    for file in sorted(set(files.values())):
        with open_safetensors(path / file) as f:
            for name in f.keys():
                if (m := MXFP4_TENSOR.match(name)):
                    piece = f.get_slice(name)
                    parts.setdefault(m["stack"], {})[m["part"]] = (name, file, tuple(piece.get_shape()), piece.get_dtype(), m["kind"])
    for stack, found in sorted(parts.items()):
        for part, other in (("blocks", "scales"), ("scales", "blocks")):
            if part in found and other not in found:
                name, file = found[part][:2]
                raise HeaprError(f"{path / file}: MXFP4 tensor {name} has no {stack}_{other}; the checkpoint is incomplete")
        for part, (name, file, shape, dtype, kind) in found.items():
            want = expected[kind] if part == "blocks" else expected[kind][:-1]
            if dtype != "U8" or shape != want:
                raise HeaprError(f"{path / file}: MXFP4 tensor {name} is {dtype} {list(shape)}, but config.json's sizes "
                                 f"need U8 {list(want)}; the checkpoint does not match its config")

def check_fp8_headers(path: Path, files: dict[str, str], block: tuple[int, int]) -> None:
    """Every FP8 weight has a block scale of the right shape (safetensors headers only), so a broken
    checkpoint is refused before any calibration, not in the middle of it."""
    shapes, fp8 = {}, []
    for file in sorted(set(files.values())):
        with open_safetensors(path / file) as f:
            for name in f.keys():
                piece = f.get_slice(name)
                shapes[name] = tuple(piece.get_shape())
                if piece.get_dtype().startswith("F8"):
                    fp8.append((name, file))
    for name, file in fp8:
        scale = shapes.get(name + SCALE_SUFFIX)
        if scale is None:
            raise HeaprError(f"{path / file}: FP8 tensor {name} has no {name + SCALE_SUFFIX}; the checkpoint is incomplete")
        try:
            check_scale_shape(shapes[name], scale, block, name)
        except HeaprError as err:
            raise HeaprError(f"{path / file}: {err}") from None
