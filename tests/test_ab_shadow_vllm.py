"""Shadow mode over two real vLLM servers: the bundled model dense (A) and pruned 25% (B), each served
in float32 on the CPU. For the same prompts, the proxy's shadow comparisons report exactly what
`heapr-serve eval --greedy` (greedy decoding of the two checkpoints in transformers) gives: the same
number of identical answers and the same first differing tokens."""

from __future__ import annotations

import json
import time
from importlib.util import find_spec

import httpx
import pytest
from conftest import EXAMPLE_MODEL, run_cli
from heapr_serve.ab.local_vllm import LocalVllmServer
from heapr_serve.ab.metrics import read_counter_sum
from tests.test_ab_proxy import _metrics, proxy

pytestmark = pytest.mark.skipif(find_spec("vllm") is None or not (EXAMPLE_MODEL / "config.json").is_file(),
                                reason="needs vLLM and the bundled example model")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "import numpy as np",
           "The quick brown fox", "In this tutorial we will", "class Stack:", "for i in range("]
TOKENS = 12


def test_shadow_agreement_matches_greedy_decoding_of_both_checkpoints(tmp_path):
    pruned = tmp_path / "pruned"
    code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", pruned, "--ratio", "0.25", "--nsamples", "16", "--seq-len", "128")
    assert code == 0, err[-2000:]
    extra = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]  # (eager: half the start-up)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    servers = [LocalVllmServer(f, served_name=n, extra=extra, env=env, log=tmp_path / f"{n}.log")
               for f, n in ((EXAMPLE_MODEL, "dense"), (pruned, "pruned"))]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        with proxy(servers[0].url, servers[1].url, share_b=0.0, shadow_rate=1.0, shadow_max_tokens=TOKENS, seed=0) as srv:
            for prompt in PROMPTS:
                r = httpx.post(srv.url + "/v1/completions", json={"model": "dense", "prompt": prompt, "max_tokens": TOKENS,
                                                                 "ignore_eos": True}, timeout=60)
                assert r.status_code == 200, r.text
            deadline = time.monotonic() + 60
            while read_counter_sum(_metrics(srv.url), "heapr_ab_shadow_total", result="match") + \
                    read_counter_sum(_metrics(srv.url), "heapr_ab_shadow_total", result="differ") < len(PROMPTS):
                assert read_counter_sum(_metrics(srv.url), "heapr_ab_shadow_total", result="failed") == 0
                assert time.monotonic() < deadline, "shadow comparisons did not finish"
                time.sleep(0.2)
            text = _metrics(srv.url)
    finally:
        for s in servers:
            s.stop()
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    code, _, err = run_cli("eval", EXAMPLE_MODEL, pruned, "--greedy", tmp_path / "prompts.txt", "--greedy-tokens", str(TOKENS),
                           "--max-tokens", "256", "--json", tmp_path / "eval.json")
    assert code == 0, err[-2000:]
    row = json.loads((tmp_path / "eval.json").read_text())["greedy_agreement"][0]
    matches, first_diffs = row["identical"], [f for f in row["first_diff"] if f is not None]
    shadow_matches = read_counter_sum(text, "heapr_ab_shadow_total", result="match")
    print(f"shadow: {shadow_matches:.0f}/{len(PROMPTS)} identical greedy answers; eval --greedy: {matches}/{len(PROMPTS)}, "
          f"first differences at {first_diffs}")
    assert shadow_matches == matches
    assert read_counter_sum(text, "heapr_ab_shadow_first_diff_tokens_sum") == sum(first_diffs)
    assert 0 < len(first_diffs) < len(PROMPTS) or matches == len(PROMPTS)
