"""Benchmark HEAPr scoring against a plain forward+backward pass and the paper's two-stage method.

On a random MoE with Qwen3-30B-A3B's proportions scaled down to fit a CPU (expert width / hidden =
0.375, top-8 of many experts), prints:
  (a) one-pass scoring time / plain forward+backward time (activation gradients only, same forward
      code, same data)                                   target <= 1.25
  (b) bytes of statistics / (8 x number of atomic experts)   target <= 1.1
  (c) two-stage (explicit H x H covariance) time / one-pass time
  (g) the pass `compress` runs for every method (HEAPr's sums + the Fisher sum of --method fisher +
      REAP's) / HEAPr's sums alone                       target <= 1.05 (fisher costs what heapr costs)
Runs alternate A and B several times and report medians, so machine noise hits both alike.

With --streamed it measures the streamed calibration pass instead (each run in a fresh process, so
peak resident memory is that run's own; in-memory and streamed alternate):
  (d) streamed / in-memory wall time (load + calibration) on a model that fits    target <= 1.3
  (e) streamed peak RSS - baseline, against 1.2 x (one decoder layer + saved activations)
  (f) the same on a model whose float32 weights are >= 4x the streamed peak (streamed only)

With --reconstruct it measures what `compress --reconstruct` adds (the same random model as --streamed,
`compress` in-process, plain and with each --reconstruct-inputs, alternating):
  (h) compress --reconstruct wall / compress wall        target <= 1.5

With --heal, the same for what `compress --heal` adds (plain, --heal with its defaults, --heal --reconstruct):
  (i) compress --heal wall / compress wall               target <= 2.0

With --quantize, the whole `compress --streamed` command on the big random model of --streamed (each
run a fresh process): the calibration pass alone, compress, and compress --quantize w4a16 (GPTQ), and
with --with-heal compress --heal (few steps: its memory is there from the first step):
  (j) peak RSS - baseline of each, against the streamed bound 1.2 x (one layer + saved activations)

Usage: python -m tools.bench_compress [--hidden 512 --experts 64 --width 192 --layers 2 --repeats 3]
       python -m tools.bench_compress --reconstruct [--repeats 3]
       python -m tools.bench_compress --heal [--nsamples 64 --repeats 3]
       python -m tools.bench_compress --streamed [--big-layers 24 --big-hidden 1024 --big-experts 64 --big-width 512]
       python -m tools.bench_compress --quantize [--big-layers 24 ...] [--workdir DIR]

Over 400 lines because each measure (a)-(j) needs its own alternating A/B driver beside the shared
model builders; one file keeps the `python -m tools.bench_compress` entry point the docs cite.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
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
from heapr_serve.score.observers import HeaprObserver, MethodStatsObserver
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


GIB = 1024**3
ROOT = Path(__file__).resolve().parent.parent


def write_random_qwen3_moe(folder: Path, layers: int, hidden: int, experts: int, width: int, top_k: int = 8,
                           dtype: torch.dtype = torch.bfloat16, vocab: int = 4096, seed: int = 0) -> Path:
    """A random Qwen3-MoE written one decoder layer (one shard) at a time, so a model far bigger
    than memory can be made; per-expert 2-D tensors as transformers writes them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    heads, kv, head_dim = max(1, hidden // 128), max(1, hidden // 512), 128
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab,
              "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": head_dim, "num_experts": experts, "num_experts_per_tok": top_k,
              "moe_intermediate_size": width, "intermediate_size": 4 * hidden, "decoder_sparse_step": 1,
              "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
              "rope_theta": 1e6, "tie_word_embeddings": False, "eos_token_id": 0, "pad_token_id": 0,
              "dtype": str(dtype).removeprefix("torch."), "attention_bias": False}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, fan_in):
        return (torch.randn(*shape, generator=gen) * fan_in**-0.5).to(dtype)

    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})

    shard("model-embed.safetensors", {"model.embed_tokens.weight": rnd(vocab, hidden, fan_in=1), "model.norm.weight": torch.ones(hidden, dtype=dtype),
                                      "lm_head.weight": rnd(vocab, hidden, fan_in=hidden)})
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype), p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
             p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden, fan_in=hidden),
             p + "self_attn.k_proj.weight": rnd(kv * head_dim, hidden, fan_in=hidden),
             p + "self_attn.v_proj.weight": rnd(kv * head_dim, hidden, fan_in=hidden),
             p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim, fan_in=heads * head_dim),
             p + "self_attn.q_norm.weight": torch.ones(head_dim, dtype=dtype), p + "self_attn.k_norm.weight": torch.ones(head_dim, dtype=dtype),
             p + "mlp.gate.weight": rnd(experts, hidden, fan_in=hidden)}
        for e in range(experts):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(width, hidden, fan_in=hidden)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(width, hidden, fan_in=hidden)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(hidden, width, fan_in=width)
        shard(f"model-layer{layer:03d}.safetensors", t)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, folder: Path, nsamples: int, seq_len: int, batch_size: int, dtype: str) -> None:
    """One calibration (or, mode "compress ARGS...", one `compress` command) in this (fresh) process;
    prints JSON: baseline and peak RSS, wall times."""
    import heapr_serve  # noqa: F401
    from heapr_serve.score.calibration_pass import collect
    from heapr_serve.score.streamed import StreamedPass

    if mode.startswith("compress"):
        from typer.testing import CliRunner

        from heapr_serve.cli import app

        runner = CliRunner()
        baseline, start = _peak_rss(), time.perf_counter()
        result = runner.invoke(app, ["compress", str(folder), *mode.split()[1:]])
        if result.exit_code != 0:
            raise SystemExit(f"compress failed: {result.output[-3000:]}")
        print(json.dumps({"baseline": baseline, "peak": _peak_rss(), "wall": time.perf_counter() - start, "load": 0.0}))
        return

    torch_dtype = getattr(torch, dtype)
    config = json.loads((folder / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet([torch.randint(0, config["vocab_size"], (seq_len,), generator=g) for _ in range(nsamples)], "random", seq_len)
    batches = list(calib.batches(batch_size, 0))
    baseline = _peak_rss()
    start = time.perf_counter()
    if mode == "in-memory":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        loaded = time.perf_counter()
        collect_statistics(model, batches, float(batch_size * seq_len))
    else:
        loaded = start
        collect(StreamedPass(folder, torch_dtype, torch.device("cpu")), batches, float(batch_size * seq_len))
    end = time.perf_counter()
    print(json.dumps({"baseline": baseline, "peak": _peak_rss(), "wall": end - start, "load": loaded - start}))


def _run_child(mode: str, folder: Path, args, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "tools.bench_compress", "--child", mode, str(folder), "--nsamples", str(args.nsamples),
                          "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--dtype", dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _layer_and_activation_bytes(folder: Path, args, dtype: str) -> tuple[int, int]:
    from heapr_serve.score.memory import estimate

    config = json.loads((folder / "config.json").read_text())
    need = estimate(folder, config, getattr(torch, dtype), args.batch_size, args.seq_len, -(-args.nsamples // args.batch_size))
    per = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    saved = args.nsamples * args.seq_len * config["hidden_size"] * per * (config["num_hidden_layers"] + 1)
    return need.largest_layer, saved


def reconstruct_main(args) -> None:
    """(h), or (i) with --heal: compress with each added stage / plain compress, alternating in-process."""
    from typer.testing import CliRunner

    from heapr_serve.cli import app

    if args.heal:
        modes, what, target = {"plain": [], "--heal": ["--heal"], "--heal --reconstruct": ["--heal", "--reconstruct"]}, "--heal", "(i) <= 2.0"
    else:
        modes = {"plain": [], "--reconstruct (pruned inputs)": ["--reconstruct"],
                 "--reconstruct (dense inputs)": ["--reconstruct", "--reconstruct-inputs", "dense"]}
        what, target = "--reconstruct", "(h) <= 1.5"
    walls: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}  # process CPU time: less hit by other load than wall time
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = write_random_qwen3_moe(Path(tmp) / "m", args.layers, args.hidden, args.experts, args.width, dtype=torch.float32)
        for tokenizer_file in (ROOT / "examples" / "tiny-qwen3-moe").glob("tokenizer*"):  # compress loads a tokenizer
            shutil.copy(tokenizer_file, model / tokenizer_file.name)
        g = torch.Generator().manual_seed(0)
        calib = Path(tmp) / "calib.jsonl"  # pre-tokenised random windows: the same tokens for every run
        calib.write_text("".join(json.dumps({"input_ids": torch.randint(0, 4096, (args.seq_len,), generator=g).tolist()}) + "\n"
                                 for _ in range(args.nsamples)))
        runner = CliRunner()
        for _ in range(args.repeats):
            for mode, flags in modes.items():
                cmd = ["compress", str(model), "-o", str(Path(tmp) / "out"), "--ratio", "0.5", "--overwrite", "--nsamples",
                       str(args.nsamples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--calib", str(calib), *flags]
                start, cpu = time.perf_counter(), time.process_time()
                result = runner.invoke(app, cmd)
                walls[mode].append(time.perf_counter() - start)
                cpus[mode].append(time.process_time() - cpu)
                if result.exit_code != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed: {result.output[-2000:]}")
    plain, plain_cpu = statistics.median(walls["plain"]), statistics.median(cpus["plain"])
    table = Table(title=f"compress {what}: {args.layers} x {args.experts} x {args.width}, hidden {args.hidden}, "
                        f"{args.nsamples} x {args.seq_len} tokens, {torch.get_num_threads()} threads; medians of {args.repeats} alternating runs")
    for col in ("compress", "wall s", "wall ratio", "CPU s", "CPU ratio", "target"):
        table.add_column(col, justify="left" if col == "compress" else "right")
    for mode in modes:
        wall, cpu = statistics.median(walls[mode]), statistics.median(cpus[mode])
        table.add_row(mode, f"{wall:.2f}", f"{wall / plain:.3f}", f"{cpu:.2f}", f"{cpu / plain_cpu:.3f}", "" if mode == "plain" else target)
    Console(width=160).print(table)


def streamed_main(args) -> None:
    table = Table(title=f"streamed calibration ({args.nsamples} x {args.seq_len} tokens, batch {args.batch_size}, {args.dtype}); "
                        "medians of alternating fresh processes")
    for col in ("model", "mode", "wall s", "peak RSS GiB", "over baseline GiB", "1.2 x (layer + saved) GiB", "ratio / target"):
        table.add_column(col, justify="right" if col not in ("model", "mode") else "left")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        small = write_random_qwen3_moe(Path(tmp) / "small", args.layers, args.hidden, args.experts, args.width, dtype=torch.float32)
        runs = {"in-memory": [], "streamed": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(_run_child(mode, small, args, args.dtype))
        layer, saved = _layer_and_activation_bytes(small, args, args.dtype)
        med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
        wall_ratio = med["streamed"]["wall"] / med["in-memory"]["wall"]
        for mode in runs:
            over = med[mode]["peak"] - med[mode]["baseline"]
            ratio = f"(d) {wall_ratio:.2f} <= 1.3" if mode == "streamed" else ""
            bound = f"{1.2 * (layer + saved) / GIB:.3f}" if mode == "streamed" else ""
            if mode == "streamed":
                ratio += f"; (e) {over / (1.2 * (layer + saved)):.2f} <= 1"
            table.add_row(f"{args.layers} x {args.experts} x {args.width}, hidden {args.hidden}", mode, f"{med[mode]['wall']:.2f}",
                          f"{med[mode]['peak'] / GIB:.3f}", f"{over / GIB:.3f}", bound, ratio)
        if not args.skip_big:
            big = write_random_qwen3_moe(Path(tmp) / "big", args.big_layers, args.big_hidden, args.big_experts, args.big_width)
            shutil.rmtree(small, ignore_errors=True)  # room on disk for the big one
            r = _run_child("streamed", big, args, args.dtype)
            layer, saved = _layer_and_activation_bytes(big, args, args.dtype)
            from heapr_serve.checkpoint.format import count_source_params

            fp32 = count_source_params(big) * 4
            over = r["peak"] - r["baseline"]
            table.add_row(f"{args.big_layers} x {args.big_experts} x {args.big_width}, hidden {args.big_hidden} "
                          f"(float32 weights {fp32 / GIB:.1f} GiB)", "streamed", f"{r['wall']:.1f}", f"{r['peak'] / GIB:.3f}",
                          f"{over / GIB:.3f}", f"{1.2 * (layer + saved) / GIB:.3f}",
                          f"(e) {over / (1.2 * (layer + saved)):.2f} <= 1; (f) fp32 weights / peak {fp32 / r['peak']:.1f} >= 4")
    Console(width=200).print(table)


def _time_v(argv: list[str]) -> dict:
    """Run a command under `/usr/bin/time -v` (what an operator would measure): its peak RSS and wall."""
    out = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {out.stderr[-3000:]}")
    peak_kib = next(int(line.split(":")[1]) for line in out.stderr.splitlines() if "Maximum resident set size" in line)
    wall = next(line.rsplit(" ", 1)[1] for line in out.stderr.splitlines() if "Elapsed (wall clock)" in line)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return {"peak": peak_kib * 1024, "wall": seconds}


def quantize_main(args) -> None:
    """(j): peak memory of the calibration pass, of `compress --streamed`, and of `compress --streamed
    --quantize w4a16` on the big random model, each in a fresh process; the compress runs are the real
    command under `/usr/bin/time -v`, against (k) <= 1.5 GiB for the whole run."""
    table = Table(title=f"compress --streamed on {args.big_layers} x {args.big_experts} x {args.big_width}, hidden {args.big_hidden} "
                        f"({args.nsamples} x {args.seq_len} tokens, batch {args.batch_size}, {args.dtype}); fresh process each")
    for col in ("run", "wall s", "peak RSS GiB", "over baseline GiB", "bound GiB", "(j) over / bound", "(k) peak <= 1.5 GiB"):
        table.add_column(col, justify="left" if col == "run" else "right")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        big = write_random_qwen3_moe(Path(tmp) / "big", args.big_layers, args.big_hidden, args.big_experts, args.big_width)
        for tokenizer_file in (ROOT / "examples" / "tiny-qwen3-moe").glob("tokenizer*"):  # compress loads a tokenizer
            shutil.copy(tokenizer_file, big / tokenizer_file.name)
        g = torch.Generator().manual_seed(0)
        calib = Path(tmp) / "calib.jsonl"
        calib.write_text("".join(json.dumps({"input_ids": torch.randint(0, 4096, (args.seq_len,), generator=g).tolist()}) + "\n"
                                 for _ in range(args.nsamples)))
        layer, saved = _layer_and_activation_bytes(big, args, args.dtype)
        bound = 1.2 * (layer + saved)
        baseline = _time_v([sys.executable, "-m", "heapr_serve", "--help"])["peak"]  # the interpreter and the CLI's imports
        common = ["-o", str(Path(tmp) / "out"), "--overwrite", "--streamed", "--ratio", "0.25", "--calib", str(calib),
                  "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                  "--dtype", args.dtype]
        runs = {"calibration pass alone": None, "compress --streamed": common,
                "compress --streamed --quantize w4a16 (GPTQ)": [*common, "--quantize", "w4a16"],
                f"compress --streamed --heal (--heal-steps {args.heal_steps})": [*common, "--heal", "--heal-steps", str(args.heal_steps)]}
        if args.skip_calibration_row:
            runs.pop("calibration pass alone")
        if not args.with_heal:
            runs.pop(next(name for name in runs if "--heal" in name))
        if args.skip_quantize_row:
            runs.pop("compress --streamed --quantize w4a16 (GPTQ)")
        for name, flags in runs.items():
            if flags is None:
                r = _run_child("streamed", big, args, args.dtype)
                peak, over = r["peak"], r["peak"] - r["baseline"]
                target = ""
            else:
                r = _time_v([sys.executable, "-m", "heapr_serve", "compress", str(big), *flags])
                peak, over = r["peak"], r["peak"] - baseline
                target = f"{peak / GIB:.3f} {'yes' if peak <= 1.5 * GIB else 'NO'}"
            table.add_row(name, f"{r['wall']:.1f}", f"{peak / GIB:.3f}", f"{over / GIB:.3f}", f"{bound / GIB:.3f}", f"{over / bound:.2f}", target)
            shutil.rmtree(Path(tmp) / "out", ignore_errors=True)
    Console(width=200).print(table)


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
    parser.add_argument("--streamed", action="store_true", help="measure the streamed pass (see above)")
    parser.add_argument("--reconstruct", action="store_true", help="measure what compress --reconstruct adds (see above)")
    parser.add_argument("--heal", action="store_true", help="measure what compress --heal adds (see above)")
    parser.add_argument("--quantize", action="store_true", help="measure compress --streamed --quantize's peak memory (see above)")
    parser.add_argument("--skip-calibration-row", action="store_true", help="--quantize: only the compress runs")
    parser.add_argument("--skip-quantize-row", action="store_true", help="--quantize: leave out the --quantize w4a16 run")
    parser.add_argument("--with-heal", action="store_true", help="--quantize: also compress --streamed --heal (peak memory of healing)")
    parser.add_argument("--heal-steps", type=int, default=20,
                        help="--with-heal: Adam steps per layer (memory does not depend on them: the state exists from the first)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--big-layers", type=int, default=24)
    parser.add_argument("--big-hidden", type=int, default=1024)
    parser.add_argument("--big-experts", type=int, default=64)
    parser.add_argument("--big-width", type=int, default=512)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="where the random models are written (default: the temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), args.nsamples, args.seq_len, args.batch_size, args.dtype)
    if args.streamed:
        return streamed_main(args)
    if args.quantize:
        return quantize_main(args)
    if args.reconstruct or args.heal:
        return reconstruct_main(args)
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
    plain, one_pass, two_stage, every_method = [], [], [], []
    for _ in range(args.repeats):
        plain.append(timed(lambda: plain_forward_backward(model, batches, scale)))
        one_pass.append(timed(lambda: collect_statistics(model, batches, scale, observer=HeaprObserver())))
        every_method.append(timed(lambda: collect_statistics(model, batches, scale, observer=MethodStatsObserver())))
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
    table.add_row("every method's pass incl. fisher (median s)", f"{statistics.median(every_method):.3f}", "")
    table.add_row("(g) every method's pass / HEAPr's sums alone", f"{statistics.median(every_method) / statistics.median(one_pass):.3f}", "<= 1.05")
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
