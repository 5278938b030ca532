"""Token alignment: the (token, slot) pairs of a batch sorted into BLOCK_M-row blocks, each block owned
by one expert, as the ragged GEMM kernels read them.

``align_tokens`` is pure torch (CPU or GPU, no host sync, so CUDA graphs can capture it);
``align_tokens_triton`` gives the identical result in one launch, for small batches. Pairs routed to a
width-0 expert are dropped here, so such experts cost no block, no program and no byte of weight
traffic. Every size is a function of shapes only (``max_blocks_bound``).
"""

from __future__ import annotations

import torch

from model_patches.vllm.kernels import ragged_jit


def max_blocks_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the number of expert blocks (sum_e ceil(c_e / BLOCK_M), sum c_e <= n).

    At most min(n, E) experts are non-empty and each wastes at most BLOCK_M - 1 padded rows, so the
    bound depends on shapes only: grids and buffers are sized by it and CUDA graphs can replay them.
    """
    return (num_pairs + min(num_pairs, num_experts) * (block_m - 1)) // block_m


def align_tokens(topk_ids: torch.Tensor, widths: torch.Tensor, block_m: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs into per-expert blocks of ``block_m`` rows, without a host sync.

    Returns ``sorted_ids`` int32 [max_blocks * block_m] and ``block_expert`` int32 [max_blocks]
    (max_blocks = ``max_blocks_bound``). Block b covers sorted rows b*block_m .. (b+1)*block_m - 1;
    each row holds a flat pair index t*topk + j, or topk_ids.numel() for padding. ``block_expert[b]``
    is the expert of block b, or -1 for the unused tail. Experts appear in increasing order and a
    pair keeps its original order inside its expert (stable sort), so results are deterministic.
    Pairs routed to width-0 experts appear nowhere: those experts contribute exactly zero. So do
    pairs with a negative id (how vLLM's expert_map marks experts that live on another rank).
    """
    T, k = topk_ids.shape
    E = widths.numel()
    n = T * k
    dev = topk_ids.device
    max_blocks = max_blocks_bound(n, E, block_m)
    size = max_blocks * block_m
    if n == 0:
        return (torch.empty(0, dtype=torch.int32, device=dev),
                torch.empty(0, dtype=torch.int32, device=dev))
    flat = topk_ids.reshape(-1).to(torch.int64)
    live = (flat >= 0) & (widths.to(device=dev)[flat.clamp(min=0)] > 0)
    key = torch.where(live, flat, E)  # dropped pairs go to a virtual expert E that owns no block
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    blocks = (counts + block_m - 1) // block_m
    blocks[E] = 0
    cum_blocks = torch.cumsum(blocks, 0)
    pad_start = (cum_blocks - blocks) * block_m  # first sorted row of each expert
    unpadded_start = torch.cumsum(counts, 0) - counts  # first position of each expert in sort order
    rank = torch.arange(n, device=dev) - unpadded_start[sorted_key]
    dest = torch.where(sorted_key < E, pad_start[sorted_key] + rank, size)  # `size` = dump slot
    sorted_ids = torch.full((size + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_idx = torch.arange(max_blocks, device=dev)
    block_expert = torch.searchsorted(cum_blocks[:E].contiguous(), block_idx, right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    return sorted_ids[:size], block_expert


def align_tokens_triton(topk_ids: torch.Tensor, widths: torch.Tensor, block_m: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``align_tokens`` as a single Triton program: identical output, one launch (small batches)."""
    T, k = topk_ids.shape
    E = widths.numel()
    n = T * k
    max_blocks = max_blocks_bound(n, E, block_m)
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=topk_ids.device)
    if n == 0:
        return sorted_ids, block_expert
    ragged_jit.align_small_kernel[(1,)](
        topk_ids.contiguous(), widths, sorted_ids, block_expert, n, E, max_blocks,
        BLOCK_M=block_m, E_P2=ragged_jit.triton.next_power_of_2(E),
        CHUNK=min(64, max(16, ragged_jit.triton.next_power_of_2(n))), num_warps=4,
    )
    return sorted_ids, block_expert
