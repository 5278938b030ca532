"""Tensor parallelism splits every expert's width across ranks: a pruned Qwen2-MoE (shared expert,
width-0 experts, widths 16 and 24 that split into 8/12 per rank and are zero-padded to the CPU tile)
served by the real vLLM CPU engine with --tensor-parallel-size 2 matches transformers in float32."""

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


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU cores needed for two ranks")
def test_tensor_parallel_2_matches_transformers(tmp_path, tiny_tokenizer):
    from tools.build_tiny_models import build_tiny_model

    dense = build_tiny_model("qwen2_moe", tmp_path / "dense", seed=21, tok=tiny_tokenizer, initializer_range=0.1)
    pruned = make_ragged(dense, tmp_path / "pruned", mixed_widths, seed=21)
    prompts = _prompt_ids(pruned)
    job, out = tmp_path / "job.json", tmp_path / "out.json"
    job.write_text(json.dumps({"runs": [{"model": str(pruned), "dtype": "float32", "prompts": prompts,
                                         "max_tokens": 8, "tensor_parallel_size": 2}]}))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.vllm_driver", str(job), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["runs"][0]
    assert "error" not in result, result.get("error")
    worst = 0.0
    refs = [_reference(pruned, p, t) for p, t in zip(prompts, result["tokens"])]
    for i, pos, token, top5 in _entries(result):
        ref = refs[i][pos]
        assert float(ref.max() - ref[token]) <= FP32_TOL
        worst = max(worst, max(abs(lp - float(ref[int(t)])) for t, lp in top5.items()))
    assert worst <= FP32_TOL, worst
    print(f"tensor parallel 2: max top-5 deviation from transformers {worst:.1e} nats")
