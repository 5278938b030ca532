"""Launch configuration of the ragged kernels: tile sizes from the batch's shape, fitted to the GPU's
shared memory."""

from __future__ import annotations

import dataclasses
import functools

import torch

from model_patches.vllm.kernels import ragged_jit


@dataclasses.dataclass(frozen=True)
class RaggedMoeConfig:
    """Tile sizes. ``block_m`` is shared by both GEMMs (it is the alignment of the token sort)."""

    block_m: int = 64
    gu_block_n: int = 64
    gu_block_k: int = 64
    gu_warps: int = 8
    gu_stages: int = 3
    dn_block_n: int = 128
    dn_block_k: int = 64
    dn_warps: int = 8
    dn_stages: int = 3
    group_m: int = 1
    combine_block: int = 1024


def choose_config(num_tokens: int, topk: int, num_experts: int, hidden_size: int,
                  max_width: int) -> RaggedMoeConfig:
    """Heuristic tiles from the mean number of pairs per expert (what fills an M tile).

    Up to a few hundred pairs per expert an H100 MoE layer is bound by streaming expert weights, so
    the aim is to read every weight once at full bandwidth with enough programs in flight: small M
    tiles and long K tiles while blocks are nearly empty, then one 128-row block per expert (fewer
    blocks per expert = fewer passes over its weights) with 8 warps and a deep pipeline. The gate/up
    kernel holds two fp32 accumulators, so its BLOCK_N=64 does the work of a 128-wide tile of stock
    fused-MoE; 64 also matches a width alignment of 64, so pruned widths waste no N tile. Derived from
    vLLM's tuned H100/H200 tables for these shapes, not measured here: re-derive with
    ``tools/bench_kernel_gpu.py --tune`` on the target GPU.
    """
    per_expert = num_tokens * topk / max(num_experts, 1)
    if per_expert <= 4:
        return RaggedMoeConfig(block_m=16, gu_block_n=32, gu_block_k=128, gu_warps=4, gu_stages=4,
                               dn_block_n=64, dn_block_k=128, dn_warps=4, dn_stages=4, group_m=1)
    if per_expert <= 16:
        return RaggedMoeConfig(block_m=16, gu_block_n=64, gu_block_k=128, gu_warps=4, gu_stages=3,
                               dn_block_n=128, dn_block_k=128, dn_warps=4, dn_stages=3, group_m=1)
    if per_expert <= 40:
        return RaggedMoeConfig(block_m=32, gu_block_n=64, gu_block_k=128, gu_warps=4, gu_stages=3,
                               dn_block_n=128, dn_block_k=64, dn_warps=4, dn_stages=3, group_m=1)
    return RaggedMoeConfig(block_m=128, gu_block_n=64, gu_block_k=64, gu_warps=8, gu_stages=4,
                           dn_block_n=256, dn_block_k=64, dn_warps=8, dn_stages=4, group_m=16)


def fit_to_shared_memory(cfg: RaggedMoeConfig, itemsize: int, smem_bytes: int) -> RaggedMoeConfig:
    """Lower the pipeline depth (never the tiles) until each GEMM's staged tiles fit in shared
    memory, so the H100-sized heuristic still launches on GPUs with less of it (A100: 164 KB)."""
    def need(stages, bn, bk, b_tiles):
        return stages * (cfg.block_m * bk + b_tiles * bk * bn) * itemsize

    gs, ds = cfg.gu_stages, cfg.dn_stages
    while gs > 1 and need(gs, cfg.gu_block_n, cfg.gu_block_k, 2) > smem_bytes:
        gs -= 1
    while ds > 1 and need(ds, cfg.dn_block_n, cfg.dn_block_k, 1) > smem_bytes:
        ds -= 1
    return dataclasses.replace(cfg, gu_stages=gs, dn_stages=ds)


@functools.lru_cache(maxsize=None)
def device_shared_memory(index: int) -> int:
    """Shared memory a launch on GPU `index` may use."""
    try:  # what Triton itself checks a launch against
        return int(ragged_jit.triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:
        return int(torch.cuda.get_device_properties(index).shared_memory_per_multiprocessor) - 1024
