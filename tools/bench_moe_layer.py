"""MoE layer time in vLLM: stock dense vs heapr-serve's ragged layer, unpruned and pruned.

Builds real vLLM MoE layers (the same `FusedMoEFactory` -> `MoERunner` the models use, the stock gate
and router included) at one set of layer shapes with random weights, and times `runner.forward` at
several token counts (averaged over 64 / tokens different random batches, so that decode-sized calls
see many experts, not the same top-k), interleaving the variants round by round so that load from other processes
hits them alike; reports the minimum over rounds (medians in the JSON) of process CPU time with one thread (the layer's own work, which
other jobs on a shared machine do not inflate), wall time otherwise, and wall-time ratios alongside.

  (a) stock: vLLM's own RoutedExperts (one [E, 2I, H] stack, the platform's stock kernel)
  (b) ours, unpruned: HeaprRoutedExperts with every expert at full width
  (c) ours, pruned r: widths from a random HEAPr-like pattern removing r of the neurons, aligned

Default shapes are Qwen3-30B-A3B's (hidden 2048, 128 experts of 768, top-8), bf16.

  python -m tools.bench_moe_layer --tokens 1 16 256 --ratios 0.25 0.5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.moe_layer import build_layer, pruned_widths, setup_vllm  # noqa: E402


def time_forward(cfg, runner, x: torch.Tensor) -> float:
    from vllm.forward_context import set_forward_context

    forward = getattr(runner, "_bench_forward", runner.forward)
    with torch.inference_mode(), set_forward_context(None, cfg, num_tokens=x.shape[0]):
        wall, cpu = time.perf_counter(), time.process_time()
        forward(x, x)
        return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--align", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="OMP threads; default as vLLM's CPU worker binds them (all cores but one reserved)")
    parser.add_argument("--compile", action="store_true",
                        help="time the layer as vLLM's CPU server runs it: Dynamo fullgraph + inductor, dynamic token count")
    parser.add_argument("--layouts", nargs="+", choices=["ragged", "slices", "buckets"],
                        help="time the pruned layers in each of these CPU layouts (default: the one the layer picks)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cfg = setup_vllm(dtype, max(args.tokens))

    torch.manual_seed(args.seed)
    H, E, I = args.hidden, args.experts, args.width
    weights = (
        torch.randn(E, H) * 0.05,
        (torch.randn(E, 2 * I, H) * H**-0.5).to(dtype),
        (torch.randn(E, H, I) * I**-0.5).to(dtype),
    )
    variants, layouts = {"stock": None, "ours_unpruned": [I] * E}, {}
    for r in args.ratios:
        widths = pruned_widths(E, I, r, args.align, args.seed + 1)
        for layout in args.layouts or [None]:
            name = f"ours_pruned_{int(round(r * 100))}" + (f"_{layout}" if layout else "")
            variants[name], layouts[name] = widths, layout
    runners = {}
    for i, (name, widths) in enumerate(variants.items()):
        runners[name] = build_layer(cfg, f"model.layers.{i}.mlp", H, E, I, args.top_k, dtype, widths, weights,
                                    layout=layouts.get(name))
    buckets = {n: len(r.routed_experts.quant_method.buckets) for n, r in runners.items() if n != "stock"}
    used = {n: r.routed_experts.quant_method.layout for n, r in runners.items() if n != "stock"}
    if args.compile:  # as vLLM's CPU platform compiles the model (DYNAMO_TRACE_ONCE, inductor)
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = 64
        for runner in runners.values():
            runner._bench_forward = torch.compile(runner.forward, fullgraph=True, dynamic=True, backend="inductor")

    results = {"shapes": dict(hidden=H, experts=E, width=I, top_k=args.top_k, dtype=args.dtype), "compiled": args.compile,
               "metric": "process CPU time" if args.threads == 1 else "wall time",
               "threads": torch.get_num_threads(), "buckets": buckets, "layouts": used, "ms": {}, "ratio_to_stock": {},
               "effective_ratio": {n: 1 - sum(w) / (E * I) for n, w in variants.items() if w}}
    for T in args.tokens:
        # several different batches per sample: a single decode token hits only top_k experts, whose
        # widths vary in a pruned layer, so one fixed input would measure those few experts only
        xs = [torch.randn(T, H).to(dtype) for _ in range(max(1, 64 // T))]
        walls, cpus = {n: [] for n in runners}, {n: [] for n in runners}
        for name, runner in runners.items():  # warm-up
            time_forward(cfg, runner, xs[0])
        for _ in range(args.rounds):
            for name, runner in runners.items():
                times = [time_forward(cfg, runner, x) for x in xs]
                walls[name].append(sum(t[0] for t in times) / len(xs))
                cpus[name].append(sum(t[1] for t in times) / len(xs))
        # with one thread, process CPU time is the layer's own work, robust to other jobs on a shared
        # machine (which inflate wall time while this process waits); wall time is kept for reference
        # the minimum over rounds: interference from other jobs only ever adds time
        ms = {n: min(s) * 1e3 for n, s in (cpus if args.threads == 1 else walls).items()}
        wall_ms = {n: min(s) * 1e3 for n, s in walls.items()}
        results.setdefault("median_ms", {})[T] = {n: statistics.median(s) * 1e3 for n, s in (cpus if args.threads == 1 else walls).items()}
        results["ms"][T] = ms
        results.setdefault("wall_ms", {})[T] = wall_ms
        results["ratio_to_stock"][T] = {n: ms[n] / ms["stock"] for n in ms}
        line = "  ".join(f"{n}={ms[n]:.2f}ms ({ms[n] / ms['stock']:.2f}x)" for n in ms)
        wall_line = " ".join(f"{wall_ms[n] / wall_ms['stock']:.2f}x" for n in ms)
        print(f"tokens={T:4d}  {line}   [wall-time ratios: {wall_line}]", flush=True)
    # correctness guard: unpruned ours must equal stock on the same weights
    x = torch.randn(16, H).to(dtype)
    from vllm.forward_context import set_forward_context

    with torch.inference_mode(), set_forward_context(None, cfg, num_tokens=16):
        a = runners["stock"].forward(x, x).float()
        b = runners["ours_unpruned"].forward(x, x).float()
    results["max_abs_diff_unpruned_vs_stock"] = float((a - b).abs().max())
    print(f"layouts: {used}")
    print(f"buckets per layer: {buckets}; max |ours_unpruned - stock| = {results['max_abs_diff_unpruned_vs_stock']:.3g}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
