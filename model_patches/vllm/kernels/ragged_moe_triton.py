"""One-launch-per-GEMM fused MoE for experts of *different* widths (HEAPr-pruned layers), in Triton.

A HEAPr-pruned MoE layer keeps, per routed expert e, only I_e of the I intermediate neurons; I_e may be
0. Stock fused-MoE kernels need one width for every expert, so this package carries its own, one
module per idea:

* ``ragged_layout``: ``pack_ragged_experts`` packs per-expert (gate [I_e,H], up [I_e,H], down [H,I_e])
  tensors into two 2-D tensors with per-expert row offsets (``PackedRaggedExperts``).
* ``ragged_align``: the (token, slot) pairs sorted into BLOCK_M-row blocks, each owned by one expert,
  in torch or (small batches) one Triton program; pairs on width-0 experts are dropped there.
* ``ragged_config``: tile sizes from the batch's shape, fitted to the GPU's shared memory.
* ``ragged_jit``: the Triton kernels (gate/up GEMM with per-expert N fused with SiLU-and-mul; down GEMM
  with per-expert K and the router weight applied in fp32; a top-k combine in fp32), and the guarded
  Triton import.
* this module: the launches, the torch reference, and the entry points. ``ragged_fused_moe`` runs the
  kernels; ``torch.ops.heapr.ragged_fused_moe`` is the same thing registered (on import) as a custom
  op with a fake implementation, so torch.compile traces through it and CUDA graphs capture it (every
  grid is a function of shapes only).

The package imports on machines with neither Triton nor a GPU, where ``ragged_fused_moe`` falls back to
the torch reference. With ``TRITON_INTERPRET=1`` set before Triton is imported, CPU tensors run through
the Triton kernels in the interpreter (that is how the tests check the kernels without a GPU).
"""

from __future__ import annotations

import os

import torch

from model_patches.vllm.kernels import ragged_jit
from model_patches.vllm.kernels.ragged_align import align_tokens, align_tokens_triton
from model_patches.vllm.kernels.ragged_config import RaggedMoeConfig, choose_config, device_shared_memory, fit_to_shared_memory
from model_patches.vllm.kernels.ragged_layout import PackedRaggedExperts


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Up to this many (token, slot) pairs the alignment runs as one Triton program; above it the torch
# version's fixed launch cost is small next to the GEMMs and its sort scales better than one program.
TRITON_ALIGN_MAX_PAIRS = 1024


def _launch(hidden: torch.Tensor, packed: PackedRaggedExperts, topk_ids: torch.Tensor,
            topk_weights: torch.Tensor, cfg: RaggedMoeConfig) -> torch.Tensor:
    T, H = hidden.shape
    k = topk_ids.shape[1]
    n = T * k
    out = torch.empty((T, H), dtype=hidden.dtype, device=hidden.device)
    if packed.max_width == 0:
        return out.zero_()
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    align = align_tokens_triton if n <= TRITON_ALIGN_MAX_PAIRS else align_tokens
    sorted_ids, block_expert = align(topk_ids, packed.widths, cfg.block_m)
    num_m = block_expert.numel()
    # Two bugs of Triton's CPU interpreter (3.x) with bf16, worked around only there (never on a GPU):
    # tl.dot is a numpy matmul of the raw storage, i.e. of uint16 bit patterns, so the tiles are
    # upcast to fp32 first (exact; the same products the GPU's bf16 MMA accumulates in fp32); and its
    # fp32 -> bf16 cast truncates, so results are rounded to nearest even by hand before the store.
    interp_bf16 = _interpreting() and hidden.dtype == torch.bfloat16

    num_n1 = _cdiv(packed.max_width, cfg.gu_block_n)
    inter = torch.empty((num_m * cfg.block_m, num_n1 * cfg.gu_block_n), dtype=hidden.dtype,
                        device=hidden.device)
    ragged_jit.ragged_gate_up_kernel[(num_m * num_n1,)](
        hidden, packed.w13, inter,
        sorted_ids, block_expert, packed.widths, packed.w13_offsets,
        H, n, k, num_m, num_n1,
        hidden.stride(0), packed.w13.stride(0), inter.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.gu_block_n, BLOCK_K=cfg.gu_block_k,
        GROUP_M=cfg.group_m, EVEN_K=(H % cfg.gu_block_k == 0), INTERP_BF16=interp_bf16,
        num_warps=cfg.gu_warps, num_stages=cfg.gu_stages,
    )

    buf = torch.empty((n, H), dtype=hidden.dtype, device=hidden.device)
    num_n2 = _cdiv(H, cfg.dn_block_n)
    ragged_jit.ragged_down_kernel[(num_m * num_n2,)](
        inter, packed.w2t, buf, topk_weights,
        sorted_ids, block_expert, packed.widths, packed.w2_offsets,
        H, n, num_m, num_n2,
        inter.stride(0), packed.w2t.stride(0), buf.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.dn_block_n, BLOCK_K=cfg.dn_block_k,
        GROUP_M=cfg.group_m, EVEN_N=(H % cfg.dn_block_n == 0), INTERP_BF16=interp_bf16,
        num_warps=cfg.dn_warps, num_stages=cfg.dn_stages,
    )

    block = min(cfg.combine_block, ragged_jit.triton.next_power_of_2(H))
    ragged_jit.combine_kernel[(T, _cdiv(H, block))](
        buf, out, topk_ids, packed.widths,
        H, k, buf.stride(0), out.stride(0),
        BLOCK=block, INTERP_BF16=interp_bf16, num_warps=4 if block >= 512 else 1,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Torch implementation (reference for tests, fallback where the kernels cannot run)
# --------------------------------------------------------------------------------------------------


def ragged_moe_reference(hidden: torch.Tensor, packed: PackedRaggedExperts, topk_ids: torch.Tensor,
                         topk_weights: torch.Tensor, compute_dtype: torch.dtype = torch.float32
                         ) -> torch.Tensor:
    """Per-expert loop in ``compute_dtype``, result in hidden's dtype. Slow (host syncs), exact
    semantics: the fallback on machines without the kernels, and a cross-check of the packing."""
    T, H = hidden.shape
    x = hidden.to(compute_dtype)
    out = torch.zeros((T, H), dtype=compute_dtype, device=hidden.device)
    widths = packed.widths.tolist()
    w13_off = packed.w13_offsets.tolist()
    w2_off = packed.w2_offsets.tolist()
    ids = topk_ids.to(hidden.device)
    for e, i_e in enumerate(widths):
        if i_e == 0:
            continue
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        w13 = packed.w13[w13_off[e]: w13_off[e] + 2 * i_e].to(compute_dtype)
        w2t = packed.w2t[w2_off[e]: w2_off[e] + i_e].to(compute_dtype)
        xe = x[tok]
        a = torch.nn.functional.silu(xe @ w13[:i_e].t()) * (xe @ w13[i_e:].t())
        y = (a @ w2t) * topk_weights[tok, slot].to(compute_dtype)[:, None]
        out.index_add_(0, tok, y)
    return out.to(hidden.dtype)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def _check_args(hidden, packed, topk_ids, topk_weights):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, H], got {tuple(hidden.shape)}")
    if hidden.shape[1] != packed.hidden_size:
        raise ValueError(f"hidden size {hidden.shape[1]} != packed experts' {packed.hidden_size}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"topk_ids must be [tokens, topk], got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} != topk_ids "
                         f"{tuple(topk_ids.shape)}")
    if packed.w13.dtype != hidden.dtype or packed.w2t.dtype != hidden.dtype:
        raise ValueError(f"weights are {packed.w13.dtype}, hidden is {hidden.dtype}: cast at load time")


def chunk_tokens_default() -> int:
    """Tokens per launch: vLLM's own fused-MoE chunk (VLLM_FUSED_MOE_CHUNK_SIZE, 16K by default), so a
    long prefill never holds more than [chunk*topk, H] + [chunk*topk, max width] of work buffers."""
    try:
        import vllm.envs as envs

        return max(1, int(envs.VLLM_FUSED_MOE_CHUNK_SIZE))
    except Exception:  # vLLM absent (the kernel is usable alone): vLLM's default
        return 16 * 1024


def ragged_fused_moe(hidden: torch.Tensor, packed: PackedRaggedExperts, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor, config: RaggedMoeConfig | None = None,
                     chunk_tokens: int | None = None) -> torch.Tensor:
    """Routed-expert output of one MoE layer: sum_j w[t,j] * expert_{ids[t,j]}(hidden[t]).

    hidden [T, H] bf16/fp16 (fp32 works too, with TF32 products on a GPU), topk_ids [T, topk]
    int32/int64 indices into the packed experts (a negative id is a slot with no expert, as vLLM's
    expert_map marks non-local experts; it contributes 0), topk_weights [T, topk] (any float dtype;
    used in fp32). Returns [T, H] in hidden's dtype. On CUDA (or on CPU under TRITON_INTERPRET=1)
    the Triton kernels run; elsewhere the torch reference does.
    """
    _check_args(hidden, packed, topk_ids, topk_weights)
    hidden = hidden.contiguous()
    if hidden.shape[0] == 0:
        return torch.empty_like(hidden)
    use_triton = ragged_jit.HAS_TRITON and (hidden.is_cuda or (_interpreting() and hidden.device.type == "cpu"))
    if not use_triton:
        return ragged_moe_reference(hidden, packed, topk_ids, topk_weights)
    T = hidden.shape[0]
    chunk = chunk_tokens or chunk_tokens_default()
    if T > chunk:  # tokens are independent: launch per chunk into slices of one output
        out = torch.empty_like(hidden)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            out[s:e] = ragged_fused_moe(hidden[s:e], packed, topk_ids[s:e], topk_weights[s:e], config, chunk)
        return out
    if config is None:
        config = choose_config(T, topk_ids.shape[1], packed.num_experts, packed.hidden_size, packed.max_width)
        if hidden.is_cuda:
            config = fit_to_shared_memory(config, hidden.element_size(),
                                          device_shared_memory(hidden.device.index or 0))
    return _launch(hidden, packed, topk_ids, topk_weights, config)


@torch.library.custom_op("heapr::ragged_fused_moe", mutates_args=())
def _ragged_fused_moe_op(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2t: torch.Tensor,
    widths: torch.Tensor,
    w13_offsets: torch.Tensor,
    w2_offsets: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    max_width: int,
) -> torch.Tensor:
    """``torch.ops.heapr.ragged_fused_moe``: ``ragged_fused_moe`` with the packed layer spelled out
    as tensors (a custom op cannot take a dataclass) and the heuristic config."""
    packed = PackedRaggedExperts(w13, w2t, widths, w13_offsets, w2_offsets, max_width)
    return ragged_fused_moe(hidden, packed, topk_ids, topk_weights)


@_ragged_fused_moe_op.register_fake
def _(hidden, w13, w2t, widths, w13_offsets, w2_offsets, topk_ids, topk_weights, max_width):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)
