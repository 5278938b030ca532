"""The ragged CPU kernel alone against vLLM's CPU MoE kernel, on the same weights, no router or layer.

Separates the two sources of the pruned layer's speed-up on CPU: (a) vLLM's `_C::cpu_fused_moe` on
the dense [E, 2I, H] stack, (b) heapr's exact-width kernel (`heapr_cpu::ragged_moe`) on the same
experts at full width (the kernel's own efficiency), (c) the kernel on the experts pruned by a
HEAPr-like pattern (what pruning adds). Process CPU time, one thread, minimum over interleaved
rounds, each averaged over 64 / tokens random batches; prints each ratio to (a).

  python -m tools.bench_cpu_kernel --hidden 2048 --experts 128 --width 768 --top-k 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.moe_layer import pruned_widths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--align", type=int, default=1)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--amx-rows", type=int, nargs="+", default=[],
                        help="also time (c) with each of these AMX thresholds (pairs per expert; 0 = AVX-512 only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import vllm._custom_ops as ops

    from model_patches.vllm import cpu_ext
    from model_patches.vllm.ragged_pack import pack_experts

    if not cpu_ext.load_ragged():
        sys.exit("error: the ragged CPU kernel is unavailable here (needs AVX-512 BF16 and a C++ compiler)")
    H, E, I, K = args.hidden, args.experts, args.width, args.top_k
    dtype = torch.bfloat16
    torch.manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I) * I**-0.5).to(dtype)
    # what vLLM's CPU experts pick for bf16 here; AMX needs the kernel's per-process permission first
    isa = "amx" if torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx() else "vec"
    p13, p2 = ops.cpu_prepack_moe_weight(w13, isa), ops.cpu_prepack_moe_weight(w2, isa)
    widths = pruned_widths(E, I, args.ratio, args.align, 1)
    full = pack_experts([(w13[e, :I], w13[e, I:], w2[e]) for e in range(E)], H, dtype)
    pruned = pack_experts([None if n == 0 else (w13[e, :n], w13[e, I:I + n], w2[e][:, :n]) for e, n in enumerate(widths)],
                          H, dtype)

    def stock(x, ids, w):
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, p13, p2, None, None, w, ids, "silu", isa, False)
        return out

    default_rows = torch.ops.heapr_cpu.ragged_amx_rows(-1)

    def ragged(pk, rows=default_rows):
        def run(x, ids, w):
            torch.ops.heapr_cpu.ragged_amx_rows(rows)
            return torch.ops.heapr_cpu.ragged_moe(x, w, ids, pk.widths, pk.w13_off, pk.w2_off, pk.w13, pk.w2, pk.max_width)
        return run

    kernels = {"(a) vLLM dense": stock, "(b) ragged full": ragged(full), f"(c) ragged pruned {args.ratio:.0%}": ragged(pruned)}
    for rows in args.amx_rows:
        kernels[f"(c) amx_rows={rows}"] = ragged(pruned, rows)
    print(f"hidden {H}, {E} experts of {I}, top-{K}, bf16, vLLM ISA {isa}, AMX threshold {default_rows}; pruned keeps {sum(widths) / (E * I):.3f} of the neurons")
    for T in args.tokens:
        batches = [(torch.randn(T, H).to(dtype), torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32),
                    torch.rand(T, K)) for _ in range(max(1, 64 // T))]
        best = {k: float("inf") for k in kernels}
        for f in kernels.values():
            f(*batches[0])
        for _ in range(args.rounds):
            for k, f in kernels.items():
                t0 = time.process_time()
                for b in batches:
                    f(*b)
                best[k] = min(best[k], (time.process_time() - t0) / len(batches))
        a = best["(a) vLLM dense"]
        print(f"tokens={T:5d}  " + "  ".join(f"{k}={v * 1e3:.3f}ms ({v / a:.2f}x)" for k, v in best.items()), flush=True)


if __name__ == "__main__":
    main()
