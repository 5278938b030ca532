"""Benchmark HEAPr scoring against a plain forward+backward pass and the paper's two-stage method.

On a random MoE with Qwen3-30B-A3B's proportions scaled down to fit a CPU (expert width / hidden =
0.375, top-8 of many experts), prints:
  (a) one-pass scoring time / plain forward+backward time (activation gradients only, same forward
      code, same data)                                   target <= 1.25
  (b) bytes of statistics / (8 x number of atomic experts)   target <= 1.1
  (c) two-stage (explicit H x H covariance) time / one-pass time
Runs alternate A and B several times and report medians, so machine noise hits both alike.

Usage: python -m tools.bench_compress [--hidden 512 --experts 64 --width 192 --layers 2 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from heapr_serve.calibrate.datasets import CalibrationSet
from heapr_serve.score.calibration_pass import collect_statistics, freeze, loss_on_batch
from heapr_serve.score.moe_forward import use_sorted_forward
from heapr_serve.score.observers import HeaprObserver
from tools.two_stage_reference import two_stage_scores
from tools.build_tiny_models import build_tiny_model


def plain_forward_backward(model, batches, loss_scale):
    """The floor: the same forward and backward, with no statistics collected."""
    freeze(model)
    use_sorted_forward(model)
    for ids, mask, labels in batches:
        loss_on_batch(model, ids, mask, labels, loss_scale).backward()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-two-stage", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(
            "qwen3_moe", Path(tmp) / "m", seed=0, hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
            num_experts=args.experts, moe_intermediate_size=args.width, num_experts_per_tok=args.top_k,
        )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet([torch.randint(0, 4096, (args.seq_len,), generator=g) for _ in range(args.nsamples)], "random", args.seq_len)
    batches = list(calib.batches(args.batch_size, 0))
    scale = float(args.batch_size * args.seq_len)

    plain_forward_backward(model, batches[:1], scale)  # warm-up
    plain, one_pass, two_stage = [], [], []
    for _ in range(args.repeats):
        plain.append(timed(lambda: plain_forward_backward(model, batches, scale)))
        one_pass.append(timed(lambda: collect_statistics(model, batches, scale, observer=HeaprObserver())))
        if not args.skip_two_stage:
            two_stage.append(timed(lambda: two_stage_scores(model, batches, scale)))
    stats = collect_statistics(model, batches[:1], scale, observer=HeaprObserver())
    atomic = sum(t.numel() for t in stats.act_sq.values())

    a = statistics.median(one_pass) / statistics.median(plain)
    b = stats.nbytes() / (8 * atomic)
    table = Table(title=f"HEAPr scoring: {args.layers} MoE layers x {args.experts} experts x {args.width} (hidden {args.hidden}, top-{args.top_k}), {calib.num_tokens} tokens")
    for col in ("measure", "value", "target"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    table.add_row("plain forward+backward (median s)", f"{statistics.median(plain):.3f}", "")
    table.add_row("one-pass HEAPr scoring (median s)", f"{statistics.median(one_pass):.3f}", "")
    table.add_row("(a) scoring / plain forward+backward", f"{a:.3f}", "<= 1.25")
    table.add_row("(b) statistics bytes / (8 x atomic experts)", f"{b:.4f} ({stats.nbytes():,} B, {atomic:,} atomic experts)", "<= 1.1")
    if two_stage:
        c = statistics.median(two_stage) / statistics.median(one_pass)
        table.add_row("two-stage explicit covariance (median s)", f"{statistics.median(two_stage):.3f}", "")
        table.add_row("(c) two-stage / one-pass time", f"{c:.2f}x", "> 1")
        cov_bytes = args.layers * args.experts * args.hidden**2 * 8
        table.add_row("two-stage covariance memory (float64)", f"{cov_bytes / 2**20:,.0f} MiB ({cov_bytes / stats.nbytes():,.0f}x ours)", "")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
