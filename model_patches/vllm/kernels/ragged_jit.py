"""The Triton kernels of the ragged fused MoE; model_patches.vllm.kernels.ragged_moe_triton launches them.

* ``ragged_gate_up_kernel``: gate/up GEMM with per-expert N, fused with SiLU-and-mul;
* ``ragged_down_kernel``: down GEMM with per-expert K, the router weight applied in fp32;
* ``combine_kernel``: the top-k combine that sums each token's rows in fp32;
* ``align_small_kernel``: the token alignment in one program, for small batches
  (model_patches.vllm.kernels.ragged_align).

Triton is imported under a guard, here only: this module (and so the package) imports on machines with
neither Triton nor a GPU, where ``HAS_TRITON`` is False and no kernel is defined. With
``TRITON_INTERPRET=1`` set before Triton is imported, CPU tensors run through these kernels in the
interpreter (that is how the tests check the kernels without a GPU).
"""

from __future__ import annotations

try:  # guarded: the package must import where triton (or a GPU) is missing
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False


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
    def ragged_gate_up_kernel(
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
            if INTERP_BF16:  # interpreter only: its tl.dot multiplies bf16 bit patterns (see ragged_moe_triton)
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
    def ragged_down_kernel(
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
    def align_small_kernel(
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
    def combine_kernel(
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
