"""One-launch-per-GEMM fused MoE for experts of *different* widths (HEAPr-pruned layers), in Triton.

A HEAPr-pruned MoE layer keeps, per routed expert e, only I_e of the I intermediate neurons; I_e may be
0. Stock fused-MoE kernels need one width for every expert, so this module carries its own:

* ``pack_ragged_experts`` packs per-expert (gate [I_e,H], up [I_e,H], down [H,I_e]) tensors into
  two 2-D tensors with per-expert row offsets (the layout is described on ``PackedRaggedExperts``).
* ``align_tokens`` (pure torch, CPU or GPU, no host sync so CUDA graphs can capture it) sorts the
  (token, slot) pairs into BLOCK_M-row blocks, each block owned by one expert. Pairs routed to a width-0
  expert are dropped here, so such experts cost no block, no program and no byte of weight traffic.
  For small batches ``align_tokens_triton`` produces the identical result in one launch.
* Kernels: gate/up GEMM with per-expert N fused with SiLU-and-mul; down GEMM with per-expert K and
  the router weight applied in fp32; a top-k combine that sums each token's rows in fp32.
* ``ragged_fused_moe`` runs them; ``torch.ops.heapr.ragged_fused_moe`` is the same thing registered
  as a custom op with a fake implementation, so torch.compile traces through it and CUDA graphs
  capture it (every grid is a function of shapes only).

Triton is imported under a guard: the module imports on machines with neither Triton nor a GPU, where
``ragged_fused_moe`` falls back to a torch implementation. With ``TRITON_INTERPRET=1`` set before
Triton is imported, CPU tensors run through the Triton kernels in the interpreter (that is how the tests
check the kernels without a GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import torch

try:  # guarded: the package must import where triton (or a GPU) is missing
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "PackedRaggedExperts",
    "RaggedMoeConfig",
    "align_tokens",
    "align_tokens_triton",
    "choose_config",
    "fit_to_shared_memory",
    "pack_ragged_experts",
    "ragged_fused_moe",
    "ragged_moe_reference",
    "ragged_offsets",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------
# Packed layout
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedRaggedExperts:
    """The routed experts of one MoE layer in the layout the kernels read.

    * ``w13`` [sum_e 2*I_e, H]: expert e occupies rows ``w13_offsets[e] : w13_offsets[e] + 2*I_e``,
      its I_e gate rows first, then its I_e up rows (the per-expert order of vLLM's w13). One expert's
      whole N-range is contiguous, every row is K(=H)-contiguous, so each gate or up tile a program
      loads is BLOCK_N full-stride rows: coalesced, and the up tile sits at a fixed distance (I_e rows)
      from the gate tile, so no second offset table is needed. Interleaving gate/up per tile would buy
      nothing: the kernel issues two tile loads either way.
    * ``w2t`` [sum_e I_e, H]: expert e's down projection *transposed*, rows ``w2_offsets[e] :
      w2_offsets[e] + I_e`` (row k = neuron k's output column d_k). The down GEMM's ragged dimension is
      its reduction dimension K; stored this way the stride is H for every expert (one shared stride
      instead of one per expert), the ragged tail is whole masked rows, and the B tile is N-contiguous,
      which Hopper's wgmma reads from shared memory as well as a K-major one.
    * ``widths`` int32 [E] (I_e, 0 allowed), ``w13_offsets`` / ``w2_offsets`` int64 [E] (row offsets:
      int64 because rows * H overflows int32 on DeepSeek-V3-sized layers).
    * ``max_width``: max_e I_e as a Python int; it sizes grids and the intermediate buffer, so it must
      be static (known at load time) for CUDA graphs.

    Tensor parallelism: split every expert's neurons across ranks and pack each rank's share; the layer
    all-reduces the outputs as for a dense MoE.
    """

    w13: torch.Tensor
    w2t: torch.Tensor
    widths: torch.Tensor
    w13_offsets: torch.Tensor
    w2_offsets: torch.Tensor
    max_width: int

    @property
    def num_experts(self) -> int:
        return self.widths.numel()

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[1]

    def op(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
           ) -> torch.Tensor:
        """Call ``torch.ops.heapr.ragged_fused_moe`` on this layer: the whole per-forward boundary."""
        return torch.ops.heapr.ragged_fused_moe(hidden, self.w13, self.w2t, self.widths,
                                                self.w13_offsets, self.w2_offsets, topk_ids,
                                                topk_weights, self.max_width)

    def to(self, device=None, dtype=None) -> PackedRaggedExperts:
        """Move (and optionally cast the weights of) the packed layer; index tensors keep their dtype."""
        return PackedRaggedExperts(
            w13=self.w13.to(device=device, dtype=dtype),
            w2t=self.w2t.to(device=device, dtype=dtype),
            widths=self.widths.to(device=device),
            w13_offsets=self.w13_offsets.to(device=device),
            w2_offsets=self.w2_offsets.to(device=device),
            max_width=self.max_width,
        )


def ragged_offsets(widths: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row offsets (w13_offsets, w2_offsets), int64 [E], of each expert in the packed tensors."""
    w = torch.as_tensor(widths, dtype=torch.int64).reshape(-1).cpu()
    if (w < 0).any():
        raise ValueError(f"expert widths must be >= 0, got {w.tolist()}")
    w2_off = torch.cumsum(w, 0) - w
    return 2 * w2_off, w2_off


def pack_ragged_experts(
    experts: Sequence[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None],
    hidden_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PackedRaggedExperts:
    """Pack per-expert (gate [I_e,H], up [I_e,H], down [H,I_e]) into the kernels' layout (load time).

    A width-0 expert is given as ``None``, ``(None, None, None)`` or tensors with I_e = 0; it takes no
    rows. Shapes are checked so that a wrong checkpoint fails here, with the expert named, rather
    than as wrong numbers later. ``hidden_size`` is required only if every expert has width 0.
    """
    widths: list[int] = []
    gate_up_parts: list[torch.Tensor] = []
    down_parts: list[torch.Tensor] = []
    H = hidden_size
    for e, triple in enumerate(experts):
        if triple is None or all(t is None for t in triple):
            widths.append(0)
            continue
        if any(t is None for t in triple):
            raise ValueError(f"expert {e}: gate, up and down must all be given or all be None")
        gate, up, down = triple
        if gate.dim() != 2 or up.dim() != 2 or down.dim() != 2:
            raise ValueError(f"expert {e}: gate, up, down must be 2-D, got {tuple(gate.shape)}, "
                             f"{tuple(up.shape)}, {tuple(down.shape)}")
        i_e, h = gate.shape
        if H is None:
            H = h
        if (tuple(gate.shape) != (i_e, H) or tuple(up.shape) != (i_e, H)
                or tuple(down.shape) != (H, i_e)):
            raise ValueError(
                f"expert {e}: expected gate [I_e,{H}], up [I_e,{H}], down [{H},I_e] with one I_e, got "
                f"gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}")
        widths.append(i_e)
        if i_e:
            dt = dtype or gate.dtype
            gate_up_parts += [gate.to(device=device, dtype=dt), up.to(device=device, dtype=dt)]
            down_parts.append(down.to(device=device, dtype=dt).t())
    if H is None:
        raise ValueError("every expert has width 0: pass hidden_size")
    if not widths:
        raise ValueError("no experts given")
    if dtype is None:
        dtype = gate_up_parts[0].dtype if gate_up_parts else torch.bfloat16
    if gate_up_parts:
        w13 = torch.cat(gate_up_parts, 0).contiguous()
        w2t = torch.cat(down_parts, 0).contiguous()
    else:
        w13 = torch.empty((0, H), dtype=dtype, device=device)
        w2t = torch.empty((0, H), dtype=dtype, device=device)
    w13_off, w2_off = ragged_offsets(widths)
    return PackedRaggedExperts(
        w13=w13,
        w2t=w2t,
        widths=torch.tensor(widths, dtype=torch.int32, device=w13.device),
        w13_offsets=w13_off.to(w13.device),
        w2_offsets=w2_off.to(w13.device),
        max_width=max(widths),
    )


# --------------------------------------------------------------------------------------------------
# Token alignment (pure torch)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------


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
def _device_shared_memory(index: int) -> int:
    try:  # what Triton itself checks a launch against
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:
        return int(torch.cuda.get_device_properties(index).shared_memory_per_multiprocessor) - 1024


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """Map a flat program id to (m-block, n-tile) in GROUP_M-row groups, so the programs in flight
        share weight tiles in L2 when an expert owns several consecutive blocks."""
        per_group = GROUP_M * num_n
        group = pid // per_group
        first_m = group * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        return pid_m, pid_n

    @triton.jit
    def _round_bf16_rtne(x):
        """fp32 -> bf16 with round-to-nearest-even, by integer arithmetic. Interpreter only: its
        fp32 -> bf16 cast truncates, which would double the rounding error the tests measure; the GPU
        cast is already RTNE. (NaN/overflow handling is not needed for the tests' data.)"""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _ragged_gate_up_kernel(
        x_ptr, w13_ptr, inter_ptr,
        sorted_ids_ptr, block_expert_ptr, widths_ptr, w13_off_ptr,
        K, num_pairs, topk, num_m, num_n,
        stride_xm, stride_wn, stride_im,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """inter[row, n] = silu(x[tok] . gate_e[n]) * (x[tok] . up_e[n]) for n < I_e.

        One program per (expert block, N tile). The grid covers max_width N tiles for every block;
        tiles past the block's own expert width return at once (that is where pruning saves the
        gate/up time). Both dot products share the A tile; accumulation is fp32 and the activation is
        applied to the fp32 accumulators, so the intermediate is rounded once.
        """
        pid_m, pid_n = _swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        width = tl.load(widths_ptr + expert).to(tl.int64)
        n0 = pid_n * BLOCK_N
        if n0 >= width:
            return
        row0 = tl.load(w13_off_ptr + expert).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)
        m_mask = pair < num_pairs
        tok = (pair // topk).to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < width
        offs_k = tl.arange(0, BLOCK_K)

        a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
        g_rows = row0 + offs_n.to(tl.int64)
        g_ptrs = w13_ptr + g_rows[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        u_ptrs = g_ptrs + width * stride_wn  # the up rows follow the I_e gate rows

        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                g = tl.load(g_ptrs, mask=n_mask[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = offs_k < K - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
                u = tl.load(u_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            if INTERP_BF16:  # interpreter only: its tl.dot multiplies bf16 bit patterns (see _launch)
                a = a.to(tl.float32)
                g = g.to(tl.float32)
                u = u.to(tl.float32)
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K

        act = acc_g * tl.sigmoid(acc_g) * acc_u
        if INTERP_BF16:
            act = _round_bf16_rtne(act)
        # Whole tile, unmasked: padding rows (A masked to 0) and columns past I_e (B masked to 0)
        # hold exact zeros, so the down kernel may read them without masks. The buffer is sized to a
        # whole number of tiles in both directions.
        i_ptrs = inter_ptr + offs_m.to(tl.int64)[:, None] * stride_im + offs_n[None, :]
        tl.store(i_ptrs, act.to(inter_ptr.dtype.element_ty))

    @triton.jit
    def _ragged_down_kernel(
        inter_ptr, w2t_ptr, buf_ptr, topk_w_ptr,
        sorted_ids_ptr, block_expert_ptr, widths_ptr, w2_off_ptr,
        N, num_pairs, num_m, num_n,
        stride_im, stride_wk, stride_bm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_N: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """buf[pair, n] = w_pair * sum_{k < I_e} inter[row, k] * w2t[off_e + k, n].

        The reduction length is the block's own expert width: pruned neurons cost no iteration. The
        router weight multiplies the fp32 accumulator before the single rounding to the output dtype.
        """
        pid_m, pid_n = _swizzle(tl.program_id(0), num_m, num_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        width = tl.load(widths_ptr + expert)
        row0 = tl.load(w2_off_ptr + expert).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)
        m_mask = pair < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)

        a_ptrs = inter_ptr + offs_m.to(tl.int64)[:, None] * stride_im + offs_k[None, :]
        b_ptrs = w2t_ptr + (row0 + offs_k.to(tl.int64))[:, None] * stride_wk + offs_n[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Full K tiles need no mask on A (the gate/up kernel wrote zeros in padding rows), nor on B
        # unless H is not a multiple of BLOCK_N; a K mask would vary along A's contiguous axis and
        # cost the vectorised loads, so it is confined to the one ragged tail tile.
        for kk in range(0, width // BLOCK_K):
            a = tl.load(a_ptrs)
            if EVEN_N:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
            if INTERP_BF16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wk
        tail = width % BLOCK_K
        if tail != 0:
            k_mask = offs_k < tail
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if INTERP_BF16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)

        w = tl.load(topk_w_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
        if INTERP_BF16:
            acc = _round_bf16_rtne(acc)
        o_ptrs = buf_ptr + pair.to(tl.int64)[:, None] * stride_bm + offs_n[None, :]
        tl.store(o_ptrs, acc.to(buf_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _align_small_kernel(
        ids_ptr, widths_ptr, sorted_ids_ptr, block_expert_ptr,
        n, E, max_blocks,
        BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """``align_tokens`` in one program, for small batches (decode), where the torch version's
        ~25 tiny launches would cost more than the GEMMs. Same output, bit for bit: two passes over
        the pairs in CHUNK-sized pieces, expert counts and a stable rank by one-hot reductions."""
        e_idx = tl.arange(0, E_P2)
        j = tl.arange(0, CHUNK)
        counts = tl.zeros((E_P2,), dtype=tl.int32)
        for c in range(0, tl.cdiv(n, CHUNK)):
            offs = c * CHUNK + j
            ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
            live = (ids >= 0) & (tl.load(widths_ptr + ids, mask=ids >= 0, other=0) > 0)
            hit = (ids[:, None] == e_idx[None, :]) & live[:, None]
            counts += tl.sum(hit.to(tl.int32), axis=0)
        blocks = (counts + BLOCK_M - 1) // BLOCK_M
        cum = tl.cumsum(blocks, axis=0)  # blocks through expert e; entries >= E stay at the total
        start = (cum - blocks) * BLOCK_M

        for c in range(0, tl.cdiv(max_blocks, CHUNK)):
            b = c * CHUNK + j
            owner = tl.sum((cum[None, :] <= b[:, None]).to(tl.int32), axis=1)
            owner = tl.where(owner < E, owner, -1)
            tl.store(block_expert_ptr + b, owner, mask=b < max_blocks)
        size = max_blocks * BLOCK_M
        for c in range(0, tl.cdiv(size, CHUNK)):
            r = c * CHUNK + j
            tl.store(sorted_ids_ptr + r, tl.zeros((CHUNK,), dtype=tl.int32) + n, mask=r < size)
        tl.debug_barrier()  # the padding fill above must land before the scatter below

        seen = tl.zeros((E_P2,), dtype=tl.int32)
        for c in range(0, tl.cdiv(n, CHUNK)):
            offs = c * CHUNK + j
            ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
            live = (ids >= 0) & (tl.load(widths_ptr + ids, mask=ids >= 0, other=0) > 0)
            hit = (ids[:, None] == e_idx[None, :]) & live[:, None]
            base = tl.sum(tl.where(hit, (start + seen)[None, :], 0), axis=1)
            earlier = (ids[:, None] == ids[None, :]) & (j[None, :] < j[:, None]) & live[None, :]
            dest = base + tl.sum(earlier.to(tl.int32), axis=1)
            tl.store(sorted_ids_ptr + dest, offs, mask=live)
            seen += tl.sum(hit.to(tl.int32), axis=0)

    @triton.jit
    def _combine_kernel(
        buf_ptr, out_ptr, topk_ids_ptr, widths_ptr,
        N, topk, stride_bm, stride_om,
        BLOCK: tl.constexpr, INTERP_BF16: tl.constexpr,
    ):
        """out[t] = sum_j buf[t*topk + j] in fp32, skipping slots whose expert has width 0 (their rows
        of buf were never written, so this replaces a memset of the whole buffer)."""
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(0, topk):
            p = t * topk + j
            e = tl.load(topk_ids_ptr + p)
            w = tl.load(widths_ptr + e, mask=e >= 0, other=0)  # id < 0: no expert (expert_map)
            n_live = tl.where(w > 0, N, 0)  # 0 masks the whole row off
            acc += tl.load(buf_ptr + p * stride_bm + offs, mask=offs < n_live, other=0.0).to(tl.float32)
        if INTERP_BF16:
            acc = _round_bf16_rtne(acc)
        tl.store(out_ptr + t * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Up to this many (token, slot) pairs the alignment runs as one Triton program; above it the torch
# version's fixed launch cost is small next to the GEMMs and its sort scales better than one program.
TRITON_ALIGN_MAX_PAIRS = 1024


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
    _align_small_kernel[(1,)](
        topk_ids.contiguous(), widths, sorted_ids, block_expert, n, E, max_blocks,
        BLOCK_M=block_m, E_P2=triton.next_power_of_2(E),
        CHUNK=min(64, max(16, triton.next_power_of_2(n))), num_warps=4,
    )
    return sorted_ids, block_expert


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
    _ragged_gate_up_kernel[(num_m * num_n1,)](
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
    _ragged_down_kernel[(num_m * num_n2,)](
        inter, packed.w2t, buf, topk_weights,
        sorted_ids, block_expert, packed.widths, packed.w2_offsets,
        H, n, num_m, num_n2,
        inter.stride(0), packed.w2t.stride(0), buf.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.dn_block_n, BLOCK_K=cfg.dn_block_k,
        GROUP_M=cfg.group_m, EVEN_N=(H % cfg.dn_block_n == 0), INTERP_BF16=interp_bf16,
        num_warps=cfg.dn_warps, num_stages=cfg.dn_stages,
    )

    block = min(cfg.combine_block, triton.next_power_of_2(H))
    _combine_kernel[(T, _cdiv(H, block))](
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
    use_triton = HAS_TRITON and (hidden.is_cuda or (_interpreting() and hidden.device.type == "cpu"))
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
                                          _device_shared_memory(hidden.device.index or 0))
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
