"""The bundled model behind two real vLLM servers, both started through `heapr-serve serve`: dense (A,
which `serve` hands to stock vLLM) and pruned 25% by `compress` (B, the plugin's layer), float32.

One pair of servers for every check here, because a vLLM start-up is most of what a check costs
(three Python processes importing vLLM, ~20 s each on 2 cores):
* A answers the OpenAI routes, gives the same held-out perplexity as transformers, and real lm-eval
  (`local-completions`) against it scores the bundled local tasks exactly as a direct transformers
  computation does.
* Shadow mode over A and B: for the same prompts the proxy's shadow comparisons report exactly what
  `heapr-serve eval --greedy` (greedy decoding of both checkpoints in transformers) gives: the same
  number of identical answers and the same first differing tokens.
* Bad `eval` input is one line, exit 2.

The servers run their engine in one process beside the API server (VLLM_ENABLE_V1_MULTIPROCESSING=0,
`--distributed-executor-backend uni`, eager): a third less start-up than vLLM's default, which
tests/test_vllm_serve_cli.py runs (torch.compile, one worker process)."""

from __future__ import annotations

import json
import time
from importlib.util import find_spec

import httpx
import pytest
import torch

from conftest import EXAMPLE_MODEL, run_cli
from heapr_serve.ab.local_vllm import LocalVllmServer, free_port
from heapr_serve.ab.metrics import read_counter_sum
from heapr_serve.eval.endpoint import endpoint_perplexity
from heapr_serve.eval.harness import run_lm_eval_endpoint
from heapr_serve.eval.lm_eval_tasks.task_data import FILES
from heapr_serve.eval.perplexity import eval_tokens, perplexity
from heapr_serve.models import load_model, load_tokenizer
from tests.helpers.openai_api import check_openai_api
from tests.test_ab_proxy import _metrics, proxy

needs_servers = pytest.mark.skipif(
    find_spec("vllm") is None or find_spec("lm_eval") is None or not (EXAMPLE_MODEL / "config.json").is_file(),
    reason="needs vLLM, lm-eval and the bundled example model")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "import numpy as np",
           "The quick brown fox", "In this tutorial we will", "class Stack:", "for i in range("]
TOKENS = 12
FAST_START = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{"dense": server, "pruned": server, "pruned_folder": Path}, both ready; stopped after the module."""
    root = tmp_path_factory.mktemp("vllm-endpoints")
    pruned = root / "pruned"
    code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", pruned, "--ratio", "0.25", "--nsamples", "16", "--seq-len", "128")
    assert code == 0, err[-2000:]
    extra = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--distributed-executor-backend", "uni"]
    started = {name: LocalVllmServer(folder, served_name=name, extra=extra, env=FAST_START, log=root / f"{name}.log", through_serve=True)
               for name, folder in (("dense", EXAMPLE_MODEL), ("pruned", pruned))}
    try:
        for s in started.values():
            s.start()
        for s in started.values():
            s.wait_ready()
        yield {**started, "pruned_folder": pruned}
    finally:
        for s in started.values():
            s.stop()


@needs_servers
def test_serve_dense_folder_is_stock_vllm_and_pruned_is_ours(servers):
    check_openai_api(servers["dense"].url, "dense", EXAMPLE_MODEL)
    log = servers["dense"].log.read_text()
    assert "heapr-serve: serving" in log and "pruned" not in log.split("heapr-serve: serving", 1)[1].splitlines()[0]
    log = servers["pruned"].log.read_text()
    assert "pruned qwen3_moe" in log.split("heapr-serve: serving", 1)[1].splitlines()[0]


def _choice_accuracy(model, tokenizer, task: str, limit: int) -> float:
    """Multiple choice scored directly: argmax over choices of log p(" " + choice | context)."""
    rows = [json.loads(line) for line in FILES[task].read_text().splitlines()[:limit]]
    correct = 0
    for row in rows:
        context = tokenizer(row["context"])["input_ids"]
        scores = []
        for choice in row["choices"]:
            full = tokenizer(row["context"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
            scores.append(sum(float(logp[i - 1, full[i]]) for i in range(len(context), len(full))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    return correct / len(rows)


@needs_servers
def test_endpoint_matches_transformers(servers, tmp_path, capsys):
    url, src = servers["dense"].url, EXAMPLE_MODEL
    tokens, _ = eval_tokens(load_tokenizer(src), None)
    model = load_model(src, torch.float32, torch.device("cpu"))
    reference = perplexity(model, tokens, seq_len=128, max_tokens=2048)
    served = endpoint_perplexity(url, tokens, seq_len=128, max_tokens=2048)
    assert abs(served / reference - 1) < 0.01, (served, reference)

    # the same through the CLI, which also writes the numbers
    out = tmp_path / "eval.json"
    code, _, err = run_cli("eval", src, "--endpoint", url, "--seq-len", "128", "--max-tokens", "2048",
                           "--device", "cpu", "--json", out, capsys=capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["perplexity"]
    assert rows[0]["perplexity"] == pytest.approx(reference, rel=1e-6)
    assert rows[1]["perplexity"] == pytest.approx(served, rel=1e-6)

    # real lm-eval against the endpoint == the same multiple choice scored directly in transformers
    results = run_lm_eval_endpoint(url, "heapr_local", str(src), limit=12)
    tokenizer = load_tokenizer(src)
    for task in ("heapr_nextsent", "heapr_cloze"):
        assert results[task]["acc"] == pytest.approx(_choice_accuracy(model, tokenizer, task, 12)), task


@needs_servers
def test_shadow_agreement_matches_greedy_decoding_of_both_checkpoints(servers, tmp_path):
    with proxy(servers["dense"].url, servers["pruned"].url, share_b=0.0, shadow_rate=1.0, shadow_max_tokens=TOKENS, seed=0) as srv:
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
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    code, _, err = run_cli("eval", EXAMPLE_MODEL, servers["pruned_folder"], "--greedy", tmp_path / "prompts.txt",
                           "--greedy-tokens", str(TOKENS), "--max-tokens", "256", "--json", tmp_path / "eval.json")
    assert code == 0, err[-2000:]
    row = json.loads((tmp_path / "eval.json").read_text())["greedy_agreement"][0]
    matches, first_diffs = row["identical"], [f for f in row["first_diff"] if f is not None]
    shadow_matches = read_counter_sum(text, "heapr_ab_shadow_total", result="match")
    print(f"shadow: {shadow_matches:.0f}/{len(PROMPTS)} identical greedy answers; eval --greedy: {matches}/{len(PROMPTS)}, "
          f"first differences at {first_diffs}")
    assert shadow_matches == matches
    assert read_counter_sum(text, "heapr_ab_shadow_first_diff_tokens_sum") == sum(first_diffs)
    assert 0 < len(first_diffs) < len(PROMPTS) or matches == len(PROMPTS)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--tasks", "heapr_local"], ["--tasks", "--endpoint"]),
        ([], ["nothing to evaluate"]),
        (["--endpoint", "http://127.0.0.1:{port}"], ["--endpoint", "no answer", "heapr-serve serve"]),
        (["--endpoint", "http://127.0.0.1:{port}", "--tasks", " , "], ["--tasks"]),
        (["{model}", "--greedy", "{model}/config.json"], ["--greedy", "at least two checkpoint"]),
        (["{model}", "{model}", "--greedy", "/nonexistent/prompts.txt"], ["--greedy", "no such file"]),
        (["{model}", "{model}", "--greedy", "{model}/config.json", "--greedy-tokens", "0"], ["--greedy-tokens"]),
    ],
)
def test_eval_bad_input_is_one_line(args, needles, capsys):
    port = str(free_port())
    code, _, err = run_cli("eval", *[a.replace("{port}", port).replace("{model}", str(EXAMPLE_MODEL)) for a in args], capsys=capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
