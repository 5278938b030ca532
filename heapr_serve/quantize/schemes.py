"""The quantization schemes `heapr-serve quantize` writes, as compressed-tensors schemes.

Every scheme is one of compressed-tensors' own presets (the ones llm-compressor recipes name), so the
folder it writes is the ecosystem's format: stock vLLM reads its `quantization_config`, and so do
llm-compressor and transformers. Only the group size may be changed (`--group-size`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from heapr_serve.errors import HeaprError

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationScheme

# compressed-tensors is imported when a scheme is built, not with this module: the command line names
# the schemes in its help, and importing compressed-tensors costs every `heapr-serve` process ~8 s on 2 cores.


@dataclass(frozen=True)
class Scheme:
    name: str  # the --scheme value
    preset: str  # compressed-tensors preset
    format_member: str  # compressed-tensors `CompressionFormat` member of the weights' format
    summary: str

    @property
    def format(self) -> str:
        """The compressed-tensors compression format's value (what `quantization_config.format` says)."""
        from compressed_tensors.config import CompressionFormat

        return CompressionFormat[self.format_member].value

    def build(self, group_size: int | None) -> QuantizationScheme:
        """The compressed-tensors scheme, with `group_size` (None: the preset's; -1: per channel)."""
        from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme

        scheme = preset_name_to_scheme(self.preset, ["Linear"])
        w = scheme.weights
        if group_size is not None:
            if w.strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL):
                raise HeaprError(f"--group-size: scheme {self.name} quantises weights per {w.strategy}, it has no group size; "
                                 "drop --group-size")
            if group_size == -1:
                w = w.model_copy(update={"strategy": QuantizationStrategy.CHANNEL, "group_size": None})
            elif group_size <= 0 or group_size % 8:
                raise HeaprError(f"--group-size {group_size}: must be a positive multiple of 8 (or -1 for per channel)")
            else:
                w = w.model_copy(update={"strategy": QuantizationStrategy.GROUP, "group_size": group_size})
            scheme = scheme.model_copy(update={"weights": w})
        return scheme


    def fitting_group(self, in_dims: list[int], at_most: int | None = None) -> int | None:
        """For a grouped scheme without --group-size: the preset's group if it divides every quantized
        weight's input width (and is at most `at_most`), else the largest of 64, 32, 16, 8 that does,
        else -1 (per channel); None for a scheme without groups."""
        from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme

        preset = preset_name_to_scheme(self.preset, ["Linear"]).weights
        if preset.strategy != QuantizationStrategy.GROUP:
            return None
        for group in (preset.group_size, *[g for g in (64, 32, 16, 8) if g < preset.group_size]):
            if all(d % group == 0 for d in in_dims) and (at_most is None or group <= at_most):
                return group
        return -1


SCHEMES = {s.name: s for s in (
    Scheme("w4a16", "W4A16", "pack_quantized",
           "int4 weights, symmetric, groups of 128 along the input; 16-bit activations (Marlin / WNA16 kernels)"),
    Scheme("w4a16-asym", "W4A16_ASYM", "pack_quantized",
           "int4 weights with zero points, groups of 128; 16-bit activations"),
    Scheme("w8a16", "W8A16", "pack_quantized",
           "int8 weights, symmetric, groups of 128; 16-bit activations"),
    Scheme("w8a8", "W8A8", "int_quantized",
           "int8 weights per output channel, int8 activations per token (dynamic)"),
    Scheme("fp8", "FP8_DYNAMIC", "float_quantized",
           "FP8 e4m3 weights per output channel, FP8 activations per token (dynamic)"),
    Scheme("fp8-block", "FP8_BLOCK", "float_quantized",
           "FP8 e4m3 weights in 128x128 blocks, FP8 activations in groups of 128 (DeepSeek-V3 style)"),
)}


def scheme_for(name: str) -> Scheme:
    if name not in SCHEMES:
        raise HeaprError(f"--scheme {name!r}: unknown; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]

