#!/usr/bin/env python
"""The first-GPU acceptance pack: every CUDA path of heapr-serve checked in one command (issue 29).

    python -m tools.gpu_check --out gpu_check.json      # on a CUDA GPU: under 8 minutes on one H100
    python -m tools.gpu_check --dry-run --out FILE       # tiny shapes on CPU, Triton interpreter (the suite runs it)

Needs torch, triton, transformers and this repository; not vLLM, not the network. GPU time comes
rarely and in short windows, so everything the GPU has to tell is asked at once:

(a) the ragged Triton kernel against a float64 torch reference at Qwen3-30B-A3B, DeepSeek-V3 and
    gpt-oss-120b expert shapes, dense and pruned 25 % / 50 % (HEAPr-like per-expert widths), at 1 to
    4096 tokens, eager and replayed from a captured CUDA graph (which must give the same bits);
(b) its time against torch._grouped_mm on the dense shapes (kernel / grouped_mm), and on the pruned
    ones against the dense time scaled by (1 - r) (pruned / ((1 - r) x dense), 1.0 = savings in full);
(c) `heapr-serve compress --streamed --device cuda` on a random 2-layer model with DeepSeek-V3's MoE
    shapes (256 experts x 2048, hidden 7168, top-8, MLA attention, FP8 block-quantised as released):
    per-layer load and compute time, peak GPU memory, and the extrapolation to 61 layers and 262k
    calibration tokens, printed beside the goal (DeepSeek-V3 compressed on one GPU in 15 minutes);
(d) all of it as JSON in --out (written whole or not at all).

Exit status 0 when every correctness check holds (timings are reported, not judged), 1 when one
fails, 2 (one line) when the machine cannot run the check. gpt-oss's experts use a clamped SwiGLU with
biases that this kernel does not compute: at its shapes the kernel is checked on SiLU-and-mul.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {  # hidden, routed experts, expert width, top-k
    "qwen3-30b-a3b": (2048, 128, 768, 8),
    "deepseek-v3": (7168, 256, 2048, 8),
    "gpt-oss-120b": (2880, 128, 2880, 4),
}
DRY_SHAPES = {"tiny-a": (64, 8, 48, 2), "tiny-b": (96, 6, 40, 3)}
TOKENS, DRY_TOKENS = [1, 16, 256, 4096], [1, 17]
RATIOS = [0.25, 0.5]
TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}  # relative (Frobenius) error vs float64

DEEPSEEK_V3 = dict(hidden=7168, experts=256, width=2048, topk=8, heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   rope=64, nope=128, v=128, n_group=8, topk_group=4)
DRY_DEEPSEEK = dict(hidden=256, experts=8, width=128, topk=2, heads=2, q_lora_rank=96, kv_lora_rank=64,
                    rope=32, nope=32, v=32, n_group=2, topk_group=1)
GOAL_S = 15 * 60  # DeepSeek-V3 compressed on one GPU
FULL_LAYERS, FULL_TOKENS = 61, 128 * 2048  # DeepSeek-V3's decoder layers; the paper's calibration tokens


class CheckUnavailable(Exception):
    """This machine cannot run the check (said in one line, exit status 2)."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file for every figure")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (a check that the pack runs)")
    p.add_argument("--skip-kernel", action="store_true", help="leave out (a) and (b)")
    p.add_argument("--skip-compress", action="store_true", help="leave out (c)")
    p.add_argument("--workdir", type=Path, default=None, help="where (c) writes its random model and output (needs ~45 GB on a GPU run)")
    p.add_argument("--reps", type=int, default=20, help="timed CUDA-graph replays per point (median)")
    p.add_argument("--nsamples", type=int, default=None, help="(c) calibration samples (default 16; dry run 4)")
    p.add_argument("--seq-len", type=int, default=None, help="(c) tokens per sample (default 512; dry run 32)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# (a) and (b): the ragged kernel
# --------------------------------------------------------------------------------------------------


def _float64_reference(rmt, x, packed, ids, wts):
    import torch

    return rmt.ragged_moe_reference(x, packed, ids, wts, compute_dtype=torch.float64).double()


def _graph_replay(fn):
    """Capture `fn` in a CUDA graph and replay it once; its output."""
    import torch

    from tools.bench_kernel_gpu import capture_graph

    graph, out = capture_graph(fn)
    graph.replay()
    torch.cuda.synchronize()
    return out


def _cpu_time(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def kernel_checks(dry: bool, reps: int) -> list[dict]:
    import torch

    import model_patches.vllm.kernels.ragged_moe_triton as rmt
    from tools.bench_kernel_gpu import Timer, make_reference, pruned_widths, random_packed, rel_err, routing

    cuda = not dry
    device, dtype_name = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    dtype = getattr(torch, dtype_name)
    timer = Timer(reps, graphs=True) if cuda else _cpu_time
    rows: list[dict] = []
    for model, (H, E, I, k) in (DRY_SHAPES if dry else SHAPES).items():
        variants = [("dense", 0.0, [I] * E)]
        variants += [(f"pruned{round(r * 100)}", r, pruned_widths(E, I, r, 8 if dry else 64, int(r * 1000))) for r in RATIOS]
        dense_ms: dict[int, float] = {}
        for variant, ratio, widths in variants:
            packed = random_packed(widths, H, dtype, device, 1)
            effective = 1 - sum(widths) / (E * I)
            for T in (DRY_TOKENS if dry else TOKENS):
                x, ids, wts = routing(T, E, k, H, dtype, device, 7919 + T)
                fn = lambda: rmt.ragged_fused_moe(x, packed, ids, wts)  # noqa: E731
                out = fn()
                err = rel_err(out.double(), _float64_reference(rmt, x, packed, ids, wts))
                row = dict(model=model, variant=variant, ratio=round(effective, 4), tokens=T, dtype=dtype_name,
                           rel_err_vs_float64=err, tolerance=TOLERANCE[dtype_name], ok=err <= TOLERANCE[dtype_name])
                if cuda:
                    replayed = _graph_replay(fn)
                    row["cuda_graph_equal"] = bool(torch.equal(replayed, out))
                    row["ok"] = row["ok"] and row["cuda_graph_equal"]
                row["ms"] = timer(fn)
                if variant == "dense":
                    dense_ms[T] = row["ms"]
                    impl, reference, _ = make_reference(packed, E, I, H, x, ids, wts)
                    row["grouped_mm_impl"] = impl
                    row["grouped_mm_ms"] = timer(reference)
                    row["kernel_over_grouped_mm"] = row["ms"] / row["grouped_mm_ms"]
                    del reference
                else:
                    row["pruned_over_scaled_dense"] = row["ms"] / ((1 - effective) * dense_ms[T])
                    row["pruned_over_dense"] = row["ms"] / dense_ms[T]
                rows.append(row)
                shown = (f"  {model:14s} {variant:9s} T={T:5d} err {err:.1e} {'ok' if row['ok'] else 'FAILED'}"
                         f"  {row['ms']:.3f} ms")
                if "kernel_over_grouped_mm" in row:
                    shown += f"  kernel/grouped_mm {row['kernel_over_grouped_mm']:.2f}"
                if "pruned_over_scaled_dense" in row:
                    shown += f"  pruned/((1-r) dense) {row['pruned_over_scaled_dense']:.2f}"
                print(shown, flush=True)
                del x, ids, wts, out
            del packed
            if cuda:
                torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------
# (c): compress --streamed --device cuda on DeepSeek-V3 shapes
# --------------------------------------------------------------------------------------------------


def write_random_deepseek_v3(folder: Path, shape: dict, layers: int, device: str, vocab: int = 4096, seed: int = 0) -> Path:
    """A random DeepSeek-V3 of `layers` MoE decoder layers, FP8 block-quantised (128 x 128) as released,
    per-expert 2-D tensors as the released checkpoint stores them; one shard per layer, each made on
    `device` and written before the next is made."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tools.build_tiny_models import _NOT_QUANTISED, quantize_fp8_block

    s = shape
    fields = dict(vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=4 * s["hidden"], moe_intermediate_size=s["width"],
                  num_hidden_layers=layers, num_attention_heads=s["heads"], num_key_value_heads=s["heads"], n_shared_experts=1,
                  n_routed_experts=s["experts"], num_experts_per_tok=s["topk"], first_k_dense_replace=0, n_group=s["n_group"],
                  topk_group=s["topk_group"], kv_lora_rank=s["kv_lora_rank"], q_lora_rank=s["q_lora_rank"],
                  qk_rope_head_dim=s["rope"], qk_nope_head_dim=s["nope"], v_head_dim=s["v"], routed_scaling_factor=2.5,
                  topk_method="noaux_tc", norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config = AutoConfig.for_model("deepseek_v3", **fields)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    saved = config.to_dict()
    saved.update(architectures=["DeepseekV3ForCausalLM"], dtype="bfloat16",
                 quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
    gen = torch.Generator(device=device).manual_seed(seed)

    def tensors_of(name: str, shp: tuple) -> dict:
        if name.endswith("experts.gate_up_proj"):  # fused in memory: per expert on disk
            base, (e_n, two_i, _) = name.removesuffix("gate_up_proj"), shp
            out = {}
            for e in range(e_n):
                out.update(tensors_of(f"{base}{e}.gate_proj.weight", (two_i // 2, shp[2])))
                out.update(tensors_of(f"{base}{e}.up_proj.weight", (two_i // 2, shp[2])))
            return out
        if name.endswith("experts.down_proj"):
            base = name.removesuffix("down_proj")
            out = {}
            for e in range(shp[0]):
                out.update(tensors_of(f"{base}{e}.down_proj.weight", shp[1:]))
            return out
        if name.endswith("e_score_correction_bias"):
            return {name: (torch.randn(shp, generator=gen, device=device) * 0.1).float().cpu()}
        if len(shp) == 1:  # norms
            return {name: torch.ones(shp, dtype=torch.bfloat16)}
        w = torch.randn(shp, generator=gen, device=device) * shp[-1] ** -0.5
        if any(part in name for part in _NOT_QUANTISED):
            return {name: w.to(torch.bfloat16).cpu()}
        q, scale = quantize_fp8_block(w, (128, 128))
        return {name: q.cpu(), name + "_scale_inv": scale.cpu()}

    weight_map: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        group = f"layer{int(parts[2]):03d}" if name.startswith("model.layers.") else "outer"
        groups.setdefault(group, []).append(name)
    for group, names in groups.items():
        shard = f"model-{group}.safetensors"
        tensors: dict = {}
        for name in names:
            tensors.update(tensors_of(name, shapes[name]))
        save_file(tensors, str(folder / shard))
        weight_map.update({k: shard for k in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    for tokenizer_file in (ROOT / "examples" / "tiny-qwen3-moe").glob("tokenizer*"):  # compress loads a tokenizer
        shutil.copy(tokenizer_file, folder / tokenizer_file.name)
    return folder


def compress_check(dry: bool, workdir: Path | None, nsamples: int, seq_len: int) -> dict:
    """(c): the real `compress` command in this process (so its GPU memory can be read), with the
    streamed pass's layer loads and steps timed."""
    import torch
    from typer.testing import CliRunner

    import heapr_serve.score.streamed as streamed
    from heapr_serve.cli import app

    device = "cpu" if dry else "cuda"
    shape = DRY_DEEPSEEK if dry else DEEPSEEK_V3
    layers = 2
    with tempfile.TemporaryDirectory(dir=workdir, prefix="gpu-check-") as tmp:
        start = time.perf_counter()
        source = write_random_deepseek_v3(Path(tmp) / "deepseek-v3-random", shape, layers, device)
        source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        made_s = time.perf_counter() - start
        print(f"  random DeepSeek-V3 ({layers} layers, {source_bytes / 1e9:.2f} GB FP8) written in {made_s:.1f} s", flush=True)
        g = torch.Generator().manual_seed(0)
        calib = Path(tmp) / "calib.jsonl"
        calib.write_text("".join(json.dumps({"input_ids": torch.randint(0, 4096, (seq_len,), generator=g).tolist()}) + "\n"
                                 for _ in range(nsamples)))
        stamps: list[tuple[str, float]] = []
        loads: list[float] = []
        real_load, real_step = streamed.StreamedPass._load_layer, streamed.StreamedPass._step

        def timed_load(self, model, layer):
            t0 = time.perf_counter()
            module = real_load(self, model, layer)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            loads.append(time.perf_counter() - t0)
            return module

        def timed_step(self, what):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append((what, time.perf_counter()))
            real_step(self, what)

        out = Path(tmp) / "out"
        cmd = ["compress", str(source), "-o", str(out), "--streamed", "--device", device, "--ratio", "0.5", "--calib", str(calib),
               "--nsamples", str(nsamples), "--seq-len", str(seq_len), "--batch-size", "4" if not dry else "2", "--dtype", "bfloat16"]
        if not dry:
            torch.cuda.reset_peak_memory_stats()
        streamed.StreamedPass._load_layer, streamed.StreamedPass._step = timed_load, timed_step
        try:
            t0 = time.perf_counter()
            result = CliRunner().invoke(app, cmd)
            wall = time.perf_counter() - t0
        finally:
            streamed.StreamedPass._load_layer, streamed.StreamedPass._step = real_load, real_step
        if result.exit_code != 0:
            tail = (result.output or "")[-2000:] + (f"\n{result.exception!r}" if result.exception else "")
            return {"ok": False, "command": "heapr-serve " + " ".join(cmd), "error": tail}
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        peak_gpu = torch.cuda.max_memory_allocated() if not dry else None
    # the calibration's steps: forward layer 0..L-1, loss, backward layer L-1..0 (one load each layer step)
    times = [b - a for (_, a), (_, b) in zip(stamps, stamps[1:])]
    names = [w for w, _ in stamps[1:]]
    forward = [t for w, t in zip(names, times) if w.startswith("forward")]  # layers 1.. (layer 0's start is not stamped)
    backward = [t for w, t in zip(names, times) if w.startswith("backward")]
    load = sum(loads) / len(loads) if loads else 0.0
    tokens = nsamples * seq_len
    fwd_compute = max(0.0, sum(forward) / max(1, len(forward)) - load)
    bwd_compute = max(0.0, sum(backward) / max(1, len(backward)) - load)
    calibration_end = stamps[-1][1] if stamps else t0
    rest = wall - (calibration_end - t0)  # set-up, ranking, writing the pruned checkpoint
    scale = FULL_TOKENS / tokens
    full = FULL_LAYERS * (2 * load + (fwd_compute + bwd_compute) * scale) + rest * FULL_LAYERS / layers
    summary = {
        "ok": True, "command": "heapr-serve " + " ".join(cmd), "device": device, "layers": layers,
        "shape": shape, "source_bytes": source_bytes, "output_bytes": out_bytes, "calibration_tokens": tokens,
        "wall_s": wall, "per_layer": {"load_s": load, "forward_compute_s": fwd_compute, "backward_compute_s": bwd_compute},
        "loads_s": loads, "steps": [{"step": w, "s": t} for w, t in zip(names, times)],
        "set_up_rank_write_s": rest, "peak_gpu_bytes": peak_gpu,
        "extrapolated_full_s": full, "extrapolation": f"{FULL_LAYERS} layers x (2 loads + compute x {FULL_TOKENS}/{tokens} tokens) "
                                                     f"+ set-up/rank/write x {FULL_LAYERS}/{layers}",
        "goal_s": GOAL_S,
    }
    print(f"  compress: {wall:.1f} s; per layer: load {load:.2f} s (twice: forward and backward), compute forward "
          f"{fwd_compute:.2f} s + backward {bwd_compute:.2f} s at {tokens} tokens; set-up, ranking and writing {rest:.1f} s"
          + (f"; peak GPU memory {peak_gpu / 2**30:.1f} GiB" if peak_gpu else ""), flush=True)
    print(f"  extrapolated to {FULL_LAYERS} layers and {FULL_TOKENS} tokens: {full / 60:.1f} min (goal: {GOAL_S / 60:.0f} min "
          f"on one GPU){'' if not dry else ' [dry run: CPU, tiny shapes; the figure means nothing]'}", flush=True)
    return summary


# --------------------------------------------------------------------------------------------------


def environment(dry: bool) -> dict:
    import torch

    env = {"torch": torch.__version__, "dry_run": dry, "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    env["device"] = torch.cuda.get_device_name() if not dry else "cpu (Triton interpreter)"
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_check: unset TRITON_INTERPRET (or pass --dry-run): the real run times compiled kernels", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"gpu_check: {exc.name} is not installed; the pack needs torch and triton", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU (torch.cuda.is_available() is False); run with --dry-run to check the pack on CPU",
              file=sys.stderr)
        return 2
    if not args.out.parent.is_dir():
        print(f"gpu_check: --out {args.out}: folder {args.out.parent} does not exist", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report: dict = {"tool": "tools/gpu_check.py", "argv": sys.argv[1:] if argv is None else list(argv), "environment": environment(args.dry_run)}
    print(f"gpu_check on {report['environment']['device']}: torch {report['environment']['torch']}, "
          f"triton {report['environment']['triton']}", flush=True)
    failed: list[str] = []
    if not args.skip_kernel:
        print("(a, b) ragged kernel against float64, and its time", flush=True)
        report["kernel"] = kernel_checks(args.dry_run, args.reps)
        failed += [f"kernel {r['model']} {r['variant']} T={r['tokens']}" for r in report["kernel"] if not r["ok"]]
    if not args.skip_compress:
        print("(c) compress --streamed on DeepSeek-V3 MoE shapes", flush=True)
        nsamples = args.nsamples or (4 if args.dry_run else 16)
        seq_len = args.seq_len or (32 if args.dry_run else 512)
        report["compress"] = compress_check(args.dry_run, args.workdir, nsamples, seq_len)
        if not report["compress"]["ok"]:
            failed.append("compress: " + report["compress"]["error"].strip().splitlines()[-1][:300])
    report["failed"] = failed
    report["seconds"] = time.perf_counter() - start
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
    print(f"{'all checks hold' if not failed else 'FAILED: ' + '; '.join(failed)}; {report['seconds']:.0f} s; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
