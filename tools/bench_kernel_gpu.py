#!/usr/bin/env python
"""GPU benchmark of the ragged-width fused-MoE kernel (model_patches.vllm.kernels.ragged_moe_triton).

For each layer shape (Qwen3-30B-A3B: H 2048, 128 experts x 768, top-8; DeepSeek-V3: H 7168, 256
experts x 2048, top-8) and each token count (1 .. 8192) it times, on the same random routing:

  uniform   the ragged kernel with every expert at full width (what a dense layer costs it)
  pruned25  the ragged kernel on HEAPr-like ragged widths with 25% of the neurons removed
  pruned50  the same with 50% removed
  ref       a strong reference at full width: sort + torch._grouped_mm (CUTLASS) for gate/up,
            SiLU-and-mul, grouped_mm for down, weights and un-permute; per-expert cuBLAS where
            grouped_mm is unavailable
  ref_gemm  the reference's two grouped GEMMs alone (inputs pre-sorted): the bar for the GEMMs

Times are medians of CUDA-event timings of a CUDA graph replay (as vLLM runs decode; --eager to time
plain launches), with L2 flushed before every run so expert weights come from HBM as in a real
forward where the other layers evict them. Achieved TFLOP/s counts 6*H*I_e per (token, expert)
pair; GB/s counts compulsory traffic (weights of experts that got a token, plus hidden in and out).
Both are shown against ceilings measured here (a large bf16 matmul; a large device copy).

Targets (issue 6): pruned time <= (1 - r) + 0.05 of uniform; uniform within 10% of the reference at
1024+ tokens. ``--tune`` searches tile configs per shape and token count and prints the winners to
replace the heuristic in ``choose_config``.

Usage:  python tools/bench_kernel_gpu.py [--models qwen3-30b-a3b,deepseek-v3] [--tokens 1,16,1024]
                                         [--json out.json] [--tune] [--eager]
Exits with status 2 and one line on stderr when no CUDA GPU (or no Triton) is present.

Over 400 lines because the CUDA-graph timer, the real models' shape tables and the tile tuner are
one GPU session's script: a GPU lease runs it as one command (gpu_check.py imports its timer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys

MODELS = {
    "qwen3-30b-a3b": dict(hidden=2048, experts=128, width=768, topk=8),
    "deepseek-v3": dict(hidden=7168, experts=256, width=2048, topk=8),
}
DEFAULT_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
DEVICE = "cuda"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    p.add_argument("--ratios", default="0.25,0.5", help="pruning ratios to time")
    p.add_argument("--align", type=int, default=64, help="width alignment of the pruned layouts")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=30, help="timed runs per point (median reported)")
    p.add_argument("--eager", action="store_true", help="time plain launches, not a CUDA graph")
    p.add_argument("--tune", action="store_true", help="search tile configs instead of the table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Layouts and routing
# --------------------------------------------------------------------------------------------------


def pruned_widths(num_experts: int, width: int, ratio: float, align: int, seed: int) -> list[int]:
    """HEAPr-like per-expert widths: keep fractions spread around 1 - ratio (Beta, concentration 4,
    so some experts keep almost everything and a few fall to 0 at 50%), rounded to ``align``, then
    nudged one block at a time until the total is the target within one block."""
    rng = random.Random(seed)
    keep = 1.0 - ratio
    conc = 4.0
    w = [min(width, max(0, round(rng.betavariate(keep * conc, ratio * conc) * width / align) * align))
         for _ in range(num_experts)]
    target = round(keep * num_experts * width / align) * align
    while abs(sum(w) - target) >= align:
        e = rng.randrange(num_experts)
        step = align if sum(w) < target else -align
        if 0 <= w[e] + step <= width:
            w[e] += step
    return w


def random_packed(widths, hidden, dtype, device, seed):
    import torch

    from model_patches.vllm.kernels.ragged_layout import PackedRaggedExperts, ragged_offsets

    g = torch.Generator(device=device).manual_seed(seed)
    total = sum(widths)
    w13_off, w2_off = ragged_offsets(widths)
    w13 = torch.empty((2 * total, hidden), dtype=dtype, device=device).normal_(0, hidden**-0.5,
                                                                                generator=g)
    w2t = torch.empty((total, hidden), dtype=dtype, device=device).normal_(0, max(widths)**-0.5,
                                                                            generator=g)
    return PackedRaggedExperts(
        w13=w13, w2t=w2t, widths=torch.tensor(widths, dtype=torch.int32, device=device),
        w13_offsets=w13_off.to(device), w2_offsets=w2_off.to(device), max_width=max(widths))


def routing(T, E, topk, hidden, dtype, device, seed):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((T, hidden), generator=g, device=device).to(dtype)
    logits = torch.randn((T, E), generator=g, device=device)
    vals, ids = torch.topk(logits, topk, dim=-1)
    return x, ids.to(torch.int32), torch.softmax(vals, dim=-1)


# --------------------------------------------------------------------------------------------------
# Timing and ceilings
# --------------------------------------------------------------------------------------------------


def capture_graph(fn):
    """(CUDA graph of `fn`, its output tensor): warmed up on a side stream first, as vLLM captures."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class Timer:
    """Median GPU time of fn: CUDA graph replay (or plain call), L2 flushed before each run."""

    def __init__(self, reps: int, graphs: bool):
        import torch

        self.reps, self.graphs = reps, graphs
        self.flush = torch.empty(512 * 2**20, dtype=torch.int8, device="cuda")

    def __call__(self, fn) -> float:
        import torch

        for _ in range(3):  # compile + warm up outside any capture
            fn()
        run = capture_graph(fn)[0].replay if self.graphs else fn
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def ceilings(dtype):
    """Measured peaks: dense matmul TFLOP/s and device-copy GB/s (read + write)."""
    import torch

    t = Timer(reps=20, graphs=False)
    n = 8192
    a = torch.randn((n, n), device="cuda").to(dtype)
    b = torch.randn((n, n), device="cuda").to(dtype)
    mm_ms = t(lambda: torch.mm(a, b))
    del a, b
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    cp_ms = t(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n**3 / mm_ms / 1e9, 2 * 2**30 / cp_ms / 1e6


def work(widths, ids, hidden, itemsize):
    """(flops, compulsory bytes) of the routed experts for this routing."""
    import torch

    counts = torch.bincount(ids.reshape(-1).long().cpu(), minlength=len(widths)).tolist()
    flops = sum(6 * hidden * w * c for w, c in zip(widths, counts))
    weight_bytes = sum(3 * hidden * w * itemsize for w, c in zip(widths, counts) if c and w)
    act_bytes = 2 * ids.shape[0] * hidden * itemsize
    return flops, weight_bytes + act_bytes


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def make_reference(packed, E, I, H, x, ids, weights):
    """Full-width reference on the same packed weights (views, no copy): returns (full, gemm_only).

    The sort by expert is plain torch; the GEMMs are torch._grouped_mm (one launch per projection)
    where it works, else one cuBLAS mm per expert over host-side group bounds computed from this
    fixed routing (slightly favours the reference). Both are CUDA-graph capturable.
    """
    import torch
    import torch.nn.functional as F

    T, k = ids.shape
    w13_b = packed.w13.view(E, 2 * I, H).transpose(1, 2)  # [E, K=H, N=2I], column-major
    w2_b = packed.w2t.view(E, I, H)  # [E, K=I, N=H], row-major
    flat = ids.reshape(-1).long()
    counts_host = torch.bincount(flat.cpu(), minlength=E).tolist()
    bounds = [0]
    for c in counts_host:
        bounds.append(bounds[-1] + c)

    def grouped(a, b, offs):
        return torch._grouped_mm(a, b, offs=offs)

    def per_expert(a, b, offs):
        out = a.new_empty((a.shape[0], b.shape[2]))
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                torch.mm(a[lo:hi], b[e], out=out[lo:hi])
        return out

    def pipeline(gemm):
        def full():
            order = torch.argsort(flat, stable=True)
            counts = torch.zeros(E, dtype=torch.int64, device=x.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat))
            offs = torch.cumsum(counts, 0).to(torch.int32)
            xs = x[order // k]
            gu = gemm(xs, w13_b, offs)
            a = F.silu(gu[:, :I]) * gu[:, I:]
            y = gemm(a, w2_b, offs) * weights.reshape(-1)[order].to(x.dtype)[:, None]
            out = torch.empty((T * k, H), dtype=x.dtype, device=x.device)
            out[order] = y
            return out.view(T, k, H).sum(dim=1)
        return full

    offs0 = torch.tensor(bounds[1:], dtype=torch.int32, device=x.device)
    xs0 = x[torch.argsort(flat, stable=True) // k]
    a0 = torch.randn((T * k, I), device=x.device).to(x.dtype)
    name = "grouped_mm"
    gemm = grouped
    try:
        if x.dtype != torch.bfloat16:
            raise RuntimeError("grouped_mm is bf16-only")
        grouped(xs0, w13_b, offs0)
        if x.is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # no grouped_mm on this torch/GPU: per-expert cuBLAS
        name, gemm = f"per-expert cuBLAS ({type(exc).__name__})", per_expert

    def gemm_only():
        gemm(xs0, w13_b, offs0)
        gemm(a0, w2_b, offs0)

    return name, pipeline(gemm), gemm_only


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def bench_model(name, shape, args, timer, dtype, peak_tflops, peak_gbs, rows):
    import torch

    import model_patches.vllm.kernels.ragged_moe_triton as rmt
    from model_patches.vllm.kernels.ragged_align import align_tokens, align_tokens_triton
    from model_patches.vllm.kernels.ragged_config import choose_config

    H, E, I, k = shape["hidden"], shape["experts"], shape["width"], shape["topk"]
    tokens = [int(t) for t in args.tokens.split(",")]
    variants = [("uniform", 0.0, [I] * E)]
    for r in (float(v) for v in args.ratios.split(",")):
        w = pruned_widths(E, I, r, args.align, args.seed + int(r * 1000))
        variants.append((f"pruned{round(r * 100)}", r, w))
    itemsize = torch.empty((), dtype=dtype).element_size()

    for vname, ratio, widths in variants:
        eff = 1 - sum(widths) / (E * I)
        print(f"[{name}] {vname}: effective ratio {eff:.4f}, widths min {min(widths)} max "
              f"{max(widths)}, {widths.count(0)} experts at width 0", flush=True)
        packed = random_packed(widths, H, dtype, DEVICE, args.seed + 1)
        for T in tokens:
            x, ids, wts = routing(T, E, k, H, dtype, DEVICE, args.seed * 7919 + T)
            flops, nbytes = work(widths, ids, H, itemsize)
            out = rmt.ragged_fused_moe(x, packed, ids, wts)
            check = None
            if T <= 64:  # exact-semantics cross-check against the torch loop (fp32)
                check = rel_err(out, rmt.ragged_moe_reference(x, packed, ids, wts))
            ms = timer(lambda: rmt.ragged_fused_moe(x, packed, ids, wts))
            cfg = choose_config(T, k, E, H, packed.max_width)
            align = (align_tokens_triton if ids.numel() <= rmt.TRITON_ALIGN_MAX_PAIRS
                     else align_tokens)  # the one the op uses for this batch
            align_ms = timer(lambda: align(ids, packed.widths, cfg.block_m))
            rows.append(dict(model=name, tokens=T, variant=vname, ratio=eff, ms=ms, flops=flops,
                             bytes=nbytes, align_ms=align_ms, check_rel_err=check))
            if vname == "uniform":
                ref_name, ref_full, ref_gemm = make_reference(packed, E, I, H, x, ids, wts)
                ref_err = rel_err(out, ref_full())
                rows.append(dict(model=name, tokens=T, variant="ref", impl=ref_name, ratio=0.0,
                                 ms=timer(ref_full), flops=flops, bytes=nbytes,
                                 check_rel_err=ref_err))
                rows.append(dict(model=name, tokens=T, variant="ref_gemm", impl=ref_name,
                                 ratio=0.0, ms=timer(ref_gemm), flops=flops, bytes=nbytes))
                del ref_full, ref_gemm  # they hold views of the uniform weights
            line = f"  T={T:5d} {vname:9s} {ms * 1e3:10.1f} us (align {align_ms * 1e3:.1f} us)"
            if vname == "uniform":
                line += f"; ref {rows[-2]['ms'] * 1e3:.1f} us, ref GEMMs {rows[-1]['ms'] * 1e3:.1f} us"
            print(line, flush=True)
            del x, ids, wts, out
        del packed
        torch.cuda.empty_cache()
    print_table(name, rows, peak_tflops, peak_gbs)


def print_table(name, rows, peak_tflops, peak_gbs):
    mine = [r for r in rows if r["model"] == name]
    by = {(r["tokens"], r["variant"]): r for r in mine}
    print(f"\n== {name} ==  (ceilings: {peak_tflops:.0f} TFLOP/s, {peak_gbs:.0f} GB/s)")
    head = (f"{'tokens':>6} {'variant':>9} {'time us':>9} {'TFLOP/s':>8} {'%peak':>6} {'GB/s':>7} "
            f"{'%peak':>6} {'ratio':>6} {'work':>6} {'target':>6} {'ok':>4} {'err':>8}")
    print(head)
    print("-" * len(head))
    for T in sorted({r["tokens"] for r in mine}):
        uni = by.get((T, "uniform"))
        for v in ["uniform", "ref", "ref_gemm"] + sorted(
                {r["variant"] for r in mine if r["variant"].startswith("pruned")}):
            r = by.get((T, v))
            if r is None:
                continue
            s = r["ms"] * 1e-3
            tf, gb = r["flops"] / s / 1e12, r["bytes"] / s / 1e9
            ratio = target = ok = wk = ""
            if v.startswith("pruned") and uni:
                q = r["ms"] / uni["ms"]
                tgt = 1 - r["ratio"] + 0.05
                w = r["flops"] / uni["flops"] if uni["flops"] else 0.0
                ratio, target, ok = f"{q:.3f}", f"{tgt:.3f}", ("yes" if q <= tgt else "NO")
                wk = f"{w:.3f}"
                r.update(ratio_to_uniform=q, work_ratio=w, target=tgt, ok=q <= tgt)
            elif v in ("ref", "ref_gemm") and uni:
                q = uni["ms"] / r["ms"]  # uniform time relative to the reference
                ratio = f"{q:.3f}"
                if T >= 1024:
                    target, ok = "1.100", ("yes" if q <= 1.10 else "NO")
                    r.update(uniform_over_ref=q, target=1.10, ok=q <= 1.10)
                else:
                    r.update(uniform_over_ref=q)
            err = "" if r.get("check_rel_err") is None else f"{r['check_rel_err']:.1e}"
            print(f"{T:6d} {v:>9} {r['ms'] * 1e3:9.1f} {tf:8.1f} {100 * tf / peak_tflops:6.1f} "
                  f"{gb:7.0f} {100 * gb / peak_gbs:6.1f} {ratio:>6} {wk:>6} {target:>6} {ok:>4} "
                  f"{err:>8}")
    print("ratio: pruned / uniform time (target (1 - r) + 0.05); work: pruned / uniform FLOPs for this "
          "routing (at few tokens only the touched experts' widths count, so it can differ from "
          "1 - r); for ref rows, ratio = uniform / ref time (target <= 1.10 at 1024+ tokens). err: "
          "rel. error vs the torch loop (kernel rows) or vs the kernel (ref row).")
    impl = next((r.get("impl") for r in mine if r.get("impl")), None)
    if impl:
        print(f"reference GEMMs: {impl}")


def tune_model(name, shape, args, timer, dtype, rows):
    """Coordinate search per token count: block_m, then the gate/up tiles, then the down tiles."""
    import torch

    import model_patches.vllm.kernels.ragged_moe_triton as rmt
    from model_patches.vllm.kernels.ragged_config import choose_config

    H, E, I, k = shape["hidden"], shape["experts"], shape["width"], shape["topk"]
    packed = random_packed([I] * E, H, dtype, DEVICE, args.seed + 1)
    gu_opts = [(32, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 8, 4), (128, 64, 8, 4),
               (128, 64, 8, 3)]
    dn_opts = [(64, 128, 4, 4), (128, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4),
               (256, 64, 8, 4), (256, 64, 8, 3)]
    for T in (int(t) for t in args.tokens.split(",")):
        x, ids, wts = routing(T, E, k, H, dtype, DEVICE, args.seed * 7919 + T)

        def t_of(c):
            try:
                return timer(lambda: rmt.ragged_fused_moe(x, packed, ids, wts, config=c))
            except Exception as exc:  # out of shared memory / registers: not a candidate
                print(f"    skip {c}: {type(exc).__name__}", flush=True)
                return float("inf")

        base = choose_config(T, k, E, H, I)
        best, best_ms = base, t_of(base)
        for bm in (16, 32, 64, 128):
            c = dataclasses.replace(best, block_m=bm, group_m=1 if bm <= 32 else 16)
            for gn, gk, gw, gs in gu_opts:
                c2 = dataclasses.replace(c, gu_block_n=gn, gu_block_k=gk, gu_warps=gw, gu_stages=gs)
                if (ms := t_of(c2)) < best_ms:
                    best, best_ms = c2, ms
            for dn, dk, dw, ds in dn_opts:
                c2 = dataclasses.replace(best if best.block_m == bm else c, dn_block_n=dn,
                                         dn_block_k=dk, dn_warps=dw, dn_stages=ds)
                if (ms := t_of(c2)) < best_ms:
                    best, best_ms = c2, ms
        base_ms = t_of(base)
        print(f"[{name}] T={T}: heuristic {base_ms * 1e3:.1f} us, best {best_ms * 1e3:.1f} us "
              f"({base_ms / best_ms:.2f}x): {best}", flush=True)
        rows.append(dict(model=name, tokens=T, heuristic_ms=base_ms, best_ms=best_ms,
                         best=dataclasses.asdict(best)))
    del packed
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_kernel_gpu: torch is not installed; nothing to benchmark.", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernel_gpu: no CUDA GPU available (torch.cuda.is_available() is False); "
              "this benchmark only runs on a GPU.", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from model_patches.vllm.kernels import ragged_jit

    if not ragged_jit.HAS_TRITON:
        print("bench_kernel_gpu: triton is not importable; the ragged kernel needs it.",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernel_gpu: unset TRITON_INTERPRET to benchmark the compiled kernels.",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            print(f"bench_kernel_gpu: unknown model {m!r}; choose from {', '.join(MODELS)}",
                  file=sys.stderr)
            return 2
    dev = torch.cuda.get_device_name()
    timer = Timer(args.reps, graphs=not args.eager)
    peak_tflops, peak_gbs = ceilings(dtype)
    print(f"device: {dev}; torch {torch.__version__}; triton {ragged_jit.triton.__version__}; "
          f"{args.dtype}; {'eager launches' if args.eager else 'CUDA graphs'}; measured ceilings "
          f"{peak_tflops:.0f} TFLOP/s (matmul 8192^3), {peak_gbs:.0f} GB/s (1 GiB copy)", flush=True)
    rows: list[dict] = []
    for m in models:
        if args.tune:
            tune_model(m, MODELS[m], args, timer, dtype, rows)
        else:
            bench_model(m, MODELS[m], args, timer, dtype, peak_tflops, peak_gbs, rows)
    if not args.tune:
        checks = [r for r in rows if "ok" in r]
        failed = [r for r in checks if not r["ok"]]
        print(f"\ntargets met: {len(checks) - len(failed)}/{len(checks)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, dtype=args.dtype, graphs=not args.eager,
                           peak_tflops=peak_tflops, peak_gbs=peak_gbs, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
