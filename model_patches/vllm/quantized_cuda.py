"""CUDA backend of the quantized pruned experts: one vLLM quantized `fused_experts` call per width bucket.

Each width bucket of `HeaprQuantizedMoEMethod` is a uniform stack of the checkpoint's quantized
tensors. After loading, every stack is converted into exactly the layout vLLM's own compressed-tensors
MoE methods hand its Triton kernels (`fused_moe_kernel_gptq_awq` for WNA16, `fused_moe_kernel` for
W8A8 int8 / FP8), and the forward is one stock `fused_experts` call per bucket with that bucket's
`FusedMoEQuantConfig` and an `expert_map` that sends the other experts' pairs nowhere (they add exactly
zero), as the unquantized Triton fallback does per bucket. Routing, activation quantization, the
kernels and their tuning stay vLLM's.

Layouts (vLLM 0.32, `oracle/int_wna16.py` TRITON and `compressed_tensors_moe_w8a8_{int8,fp8}.py`):

* WNA16 (pack-quantized int4 / int8, groups): the int32-packed weight [n, N, K/pf] viewed as uint8
  [n, N, K*bits/8] (two nibbles a byte, low nibble first, offset 2^(bits-1) kept); group scales
  [n, N, K/g] in the model dtype; zero points uint8 [n, N*bits/8, K/g] packed along N.
* W8A8 int8 / FP8 per channel: the weight as stored [n, N, K]; float32 scales [n, N, 1]; activations
  quantized per token inside `fused_experts`.
* FP8 128x128 blocks: the weight [n, N, K]; float32 block scales [n, N/128, K/128] (gate blocks then
  up blocks, which is the stacked matrix's own blocking when the width is a multiple of 128);
  activations quantized per token in groups of 128.
"""

from __future__ import annotations

import math

import torch

from heapr_serve.errors import HeaprError
from heapr_serve.quantize.layout import QuantSpec

# BLOCK_SIZE_K of vLLM's default Triton WNA16 configs (get_moe_wna16_block_config: 32 or 64). That
# kernel loads the packed weight unmasked along K, so K must be a multiple of it (vLLM's dense layers
# always are; a pruned width need not be)
WNA16_BLOCK_K = 64


def kind(spec: QuantSpec) -> str:
    """Which vLLM Triton path a scheme takes: wna16, int8 (W8A8), fp8 (per channel), fp8_block."""
    if spec.packed and spec.strategy == "group":
        return "wna16"
    if spec.format == "int-quantized" and spec.bits == 8 and spec.strategy == "channel" and spec.dynamic_int8_activations:
        return "int8"
    if spec.kind == "float" and spec.bits == 8 and spec.strategy == "channel":
        return "fp8"
    if spec.kind == "float" and spec.bits == 8 and spec.strategy == "block":
        return "fp8_block"
    detail = f"{spec.format} {spec.bits}-bit {spec.strategy}"
    fix = ("re-quantize with --group-size 128 (channel-wise WNA16 runs only on Marlin, not wired here)" if spec.packed
           else "re-quantize with `heapr-serve quantize --scheme w8a8 | fp8 | fp8-block` and no --group-size")
    raise HeaprError(f"config.json: quantization {detail} has no vLLM Triton MoE kernel for pruned experts on CUDA; {fix}")


def unit(spec: QuantSpec) -> int:
    """What every bucket width (this rank's share) must be a multiple of on CUDA."""
    k = kind(spec)
    if k == "wna16":
        return math.lcm(int(spec.group_size), WNA16_BLOCK_K)
    if k == "fp8_block":  # gate/up rows in whole block_n rows; the down input in whole activation groups
        return math.lcm(*spec.block)
    return 1  # per-channel kernels mask both dimensions


def check_shapes(spec: QuantSpec, widths: list[int], hidden: int, tp_size: int) -> None:
    """Refuse, in one line, widths (or a hidden size) the kernels cannot run."""
    u = unit(spec)
    bad = [w for w in widths if w % u]
    if bad:
        raise HeaprError(f"the CUDA {kind(spec)} MoE kernel needs every expert width (per tensor-parallel rank) to be a "
                         f"multiple of {u}, but a bucket has width {bad[0]}; re-run `heapr-serve compress` with "
                         f"--align {u * tp_size}, then `heapr-serve quantize`")
    k = kind(spec)
    # the hidden size is the first GEMM's K: whole groups and kernel K-blocks (WNA16), whole activation groups (blocks)
    need = u if k == "wna16" else spec.block[1] if k == "fp8_block" else 1
    if hidden % need:
        raise HeaprError(f"the CUDA {k} MoE kernel needs the hidden size ({hidden}) to be a multiple of {need}; "
                         "serve this checkpoint on CPU or re-quantize with another --scheme")


def pack_zero_points(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpacked signed zero points [n, N, G] -> the kernel's uint8 [n, N*bits/8, G], with the on-disk
    offset 2^(bits-1) (the kernel subtracts them from the offset-coded weights)."""
    u = (z.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 8:
        return u.contiguous()
    n, N, G = u.shape
    u = u.view(n, N // 2, 2, G)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).contiguous()


def kernel_layout(spec: QuantSpec, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One bucket stack (as `HeaprQuantizedMoEMethod` loads it) in the layout vLLM's Triton MoE kernel
    reads: `q` the weight, `s` its scales, `z` its zero points (None when symmetric)."""
    k = kind(spec)
    if k == "wna16":
        out = {"q": q.contiguous().view(torch.uint8), "s": s.contiguous()}
        if z is not None:
            out["z"] = pack_zero_points(z, spec.bits)
        return out
    return {"q": q.contiguous(), "s": s.to(torch.float32).contiguous()}


def quant_config(spec: QuantSpec, w13: dict[str, torch.Tensor], w2: dict[str, torch.Tensor]):
    """The `FusedMoEQuantConfig` vLLM's own compressed-tensors method builds for this scheme."""
    from vllm.model_executor.layers.fused_moe import config as c

    k = kind(spec)
    if k == "wna16":
        make = c.int4_w4a16_moe_quant_config if spec.bits == 4 else c.int8_w8a16_moe_quant_config
        return make(w1_scale=w13["s"], w2_scale=w2["s"], w1_zp=w13.get("z"), w2_zp=w2.get("z"),
                    block_shape=[0, int(spec.group_size)])
    if k == "int8":
        return c.int8_w8a8_moe_quant_config(w1_scale=w13["s"], w2_scale=w2["s"], a1_scale=None, a2_scale=None,
                                            per_act_token_quant=True)
    if k == "fp8":
        return c.fp8_w8a8_moe_quant_config(w1_scale=w13["s"], w2_scale=w2["s"], per_act_token_quant=True,
                                           per_out_ch_quant=True)
    return c.fp8_w8a8_moe_quant_config(w1_scale=w13["s"], w2_scale=w2["s"], block_shape=list(spec.block))


def prepare(method, layer) -> None:
    """Convert every bucket stack in place (module parameters, so sleep mode and weight reload see
    them), build each bucket's quant config and expert map."""
    from vllm.model_executor.utils import replace_parameter

    spec = method.spec
    method.cuda_configs, method.cuda_maps = [], []
    E = len(method.widths)
    for b, bucket in enumerate(method.buckets):
        parts = {}
        for proj in (13, 2):
            z = getattr(layer, f"z{proj}_b{b}").data if not spec.symmetric else None
            t = kernel_layout(spec, getattr(layer, f"q{proj}_b{b}").data, getattr(layer, f"s{proj}_b{b}").data, z)
            for name, value in t.items():
                replace_parameter(layer, f"{name}{proj}_b{b}", value)
            parts[proj] = {name: getattr(layer, f"{name}{proj}_b{b}") for name in t}
        method.cuda_configs.append(quant_config(spec, parts[13], parts[2]))
        m = torch.full((E,), -1, dtype=torch.int32)
        m[list(bucket.experts)] = torch.arange(len(bucket.experts), dtype=torch.int32)
        layer.register_buffer(f"heapr_qmap_b{b}", m.to(getattr(layer, f"q13_b{b}").device), persistent=False)
        method.cuda_maps.append(f"heapr_qmap_b{b}")


def apply(method, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Sum of one stock quantized `fused_experts` call per bucket (width-0 experts are in no bucket)."""
    from vllm.model_executor.layers.fused_moe import fused_moe

    out = None
    for b, cfg in enumerate(method.cuda_configs):
        y = fused_moe.fused_experts(
            x, getattr(layer, f"q13_b{b}"), getattr(layer, f"q2_b{b}"), topk_weights, topk_ids,
            activation=layer.activation, global_num_experts=len(method.widths),
            expert_map=getattr(layer, method.cuda_maps[b]), quant_config=cfg)
        out = y if out is None else out.add_(y)
    return out if out is not None else torch.zeros_like(x)
