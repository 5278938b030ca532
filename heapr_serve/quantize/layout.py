"""What one quantized expert weight looks like on disk, from the scheme in config.json.

Shared by the checkpoint validator (headers only, no vLLM) and the pruned vLLM layer (which loads
and dequantizes with it), so both check the same shapes: a ragged quantized folder loads into a
stock vLLM layer without error and serves garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from heapr_serve.errors import HeaprError

_FP8 = torch.float8_e4m3fn
FORMATS = ("pack-quantized", "int-quantized", "float-quantized")


def _value(v):
    return getattr(v, "value", v)


@dataclass(frozen=True)
class QuantSpec:
    """What one expert weight [out, in] looks like on disk under the checkpoint's scheme."""

    format: str  # compressed-tensors format: pack-quantized, int-quantized, float-quantized
    bits: int
    kind: str  # int or float
    strategy: str  # group, channel, block, tensor
    group_size: int | None
    block: tuple[int, int] | None
    symmetric: bool
    dynamic_int8_activations: bool  # W8A8 int8: activations quantized per token at run time

    @classmethod
    def from_quant_config(cls, quant_config) -> "QuantSpec":
        """From vLLM's compressed-tensors config; refuses anything `heapr-serve quantize` does not write."""
        name = quant_config.get_name()
        if name != "compressed-tensors":
            raise HeaprError(f"pruned checkpoints are served quantized only in the compressed-tensors format that "
                             f"`heapr-serve quantize` writes, not {name}; drop --quantization and run `heapr-serve quantize`")
        scheme = (getattr(quant_config, "target_scheme_map", {}) or {}).get("Linear") or {}
        return cls._build(scheme.get("weights"), scheme.get("input_activations"),
                          _value(scheme.get("format") or quant_config.quant_format))

    @classmethod
    def from_config(cls, qconfig: dict, where: str = "config.json") -> "QuantSpec":
        """From a config.json `quantization_config` (compressed-tensors, one group targeting Linear)."""
        from compressed_tensors.quantization import QuantizationConfig

        if qconfig.get("quant_method") != "compressed-tensors":
            raise HeaprError(f"{where}: quantization_config is {qconfig.get('quant_method')}, not the compressed-tensors "
                             "format `heapr-serve quantize` writes; re-quantize with `heapr-serve quantize`")
        try:
            parsed = QuantizationConfig.model_validate(qconfig)
        except Exception as err:  # pydantic's message names the field
            raise HeaprError(f"{where}: quantization_config is malformed ({str(err).splitlines()[0]}); re-run `heapr-serve quantize`") from None
        groups = [g for g in parsed.config_groups.values() if "Linear" in (g.targets or [])]
        if len(parsed.config_groups) != 1 or not groups:
            raise HeaprError(f"{where}: quantization_config must have one config group targeting Linear, as "
                             "`heapr-serve quantize` writes; re-run it")
        g = groups[0]
        return cls._build(g.weights, g.input_activations, g.format or parsed.format, where)

    @classmethod
    def _build(cls, w, a, fmt, where: str = "config.json") -> "QuantSpec":
        fmt = _value(fmt)
        if w is None or fmt not in FORMATS:
            raise HeaprError(f"{where}: quantization format {fmt} is not one `heapr-serve quantize` writes for routed experts; "
                             "re-quantize with `heapr-serve quantize`")
        if _value(w.actorder) not in (None, "static", "weight"):  # these two keep groups in column order (no g_idx)
            raise HeaprError(f"{where}: activation reordering by group (actorder {_value(w.actorder)!r}, with g_idx) is not supported "
                             "for pruned experts; use actorder 'static' or re-quantize with `heapr-serve quantize`")
        block = tuple(w.block_structure) if w.block_structure else None
        spec = cls(fmt, int(w.num_bits), _value(w.type), _value(w.strategy), w.group_size, block, bool(w.symmetric),
                   a is not None and _value(a.type) == "int" and bool(a.dynamic))
        if a is not None and not spec.dynamic_int8_activations and not (_value(a.type) == "float" and a.dynamic):
            raise HeaprError(f"{where}: static activation scales are not supported for pruned experts; use a dynamic scheme")
        return spec

    @property
    def packed(self) -> bool:
        return self.format == "pack-quantized"

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    def unit(self) -> tuple[int, int]:
        """Multiples the out / in dimensions of a weight must keep (groups, blocks, packing)."""
        if self.strategy == "group":
            return 1, int(self.group_size)
        if self.strategy == "block":
            return self.block
        return 1, (self.pack_factor if self.packed else 1)

    def quantized_dtype(self) -> torch.dtype:
        if self.packed:
            return torch.int32
        return _FP8 if self.kind == "float" else torch.int8

    def scale_shape(self, out: int, inp: int) -> tuple[int, ...]:
        if self.strategy == "group":
            return out, inp // self.group_size
        if self.strategy == "channel":
            return out, 1
        if self.strategy == "block":
            return math.ceil(out / self.block[0]), math.ceil(inp / self.block[1])
        return (1,)

    def expected(self, out: int, inp: int) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...] | None]]:
        """Part name -> (shape, allowed dtypes or None for any float) of one weight [out, inp]."""
        parts = {"weight_scale": (self.scale_shape(out, inp), None)}
        if self.packed:
            parts["weight_packed"] = ((out, math.ceil(inp / self.pack_factor)), (torch.int32,))
            parts["weight_shape"] = ((2,), (torch.int64, torch.int32))
            if not self.symmetric:
                parts["weight_zero_point"] = ((math.ceil(out / self.pack_factor), self.scale_shape(out, inp)[1]), (torch.int32,))
        else:
            parts["weight"] = ((out, inp), (self.quantized_dtype(),))
            if not self.symmetric:
                parts["weight_zero_point"] = (self.scale_shape(out, inp), (torch.int8, torch.int32, _FP8))
        return parts

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, out: int, inp: int) -> torch.Tensor:
        """The weight [out, inp] that `q` stands for, with compressed-tensors' arithmetic
        ((q - zero) * scale in the scale's dtype), so it equals what its decompressor gives."""
        vals = unpack_from_int32(q, self.bits, torch.Size([out, inp])) if self.packed else q
        s = scale
        if self.strategy == "tensor":
            s = scale.reshape(1, 1)
        else:
            s = s.repeat_interleave(math.ceil(out / s.shape[0]) if self.strategy == "block" else out // s.shape[0], 0)[:out]
            s = s.repeat_interleave(math.ceil(inp / s.shape[1]), 1)[:, :inp]
        v = vals.to(scale.dtype)
        if zero is not None:
            z = zero.to(scale.dtype)
            if self.strategy != "tensor":
                z = z.repeat_interleave(out // z.shape[0], 0).repeat_interleave(math.ceil(inp / z.shape[1]), 1)[:, :inp]
            v = v - z
        return v * s
