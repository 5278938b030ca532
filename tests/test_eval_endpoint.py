"""Evaluation through a served endpoint: one real vLLM server (dense tiny model, started through
`heapr-serve serve`, which serves a dense folder with stock vLLM) answers the OpenAI routes, gives the
same held-out perplexity as transformers, and real lm-eval (`local-completions`) against it scores the
bundled local tasks exactly as a direct transformers computation does. Bad input is one line, exit 2."""

import json
from importlib.util import find_spec

import pytest
import torch

from heapr_serve.ab.local_vllm import LocalVllmServer, free_port
from heapr_serve.eval.endpoint import endpoint_perplexity
from heapr_serve.eval.harness import run_lm_eval_endpoint
from heapr_serve.eval.perplexity import eval_tokens, perplexity
from heapr_serve.eval.lm_eval_tasks.task_data import FILES
from heapr_serve.models import load_model, load_tokenizer

from conftest import EXAMPLE_MODEL, run_cli
from tests.helpers.openai_api import check_openai_api

needs_vllm = pytest.mark.skipif(find_spec("vllm") is None or find_spec("lm_eval") is None, reason="needs vllm and lm-eval")


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    extra = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]  # (eager: half the start-up; the compiled path is test_vllm_serve_cli.py's)
    # a fixed KV cache, not a share of memory: what else the machine holds must not decide the start
    with LocalVllmServer(tiny_models["qwen3_moe"], served_name="dense", extra=extra, log=log, through_serve=True,
                         env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as srv:
        srv.log_path = log
        yield srv


@needs_vllm
def test_serve_dense_folder_is_stock_vllm(server, tiny_models):
    check_openai_api(server.url, "dense", tiny_models["qwen3_moe"])
    log = server.log_path.read_text()
    assert "heapr-serve: serving" in log and "pruned" not in log.split("heapr-serve: serving", 1)[1].splitlines()[0]


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


@needs_vllm
def test_endpoint_matches_transformers(server, tiny_models, tmp_path, capsys):
    src = tiny_models["qwen3_moe"]
    tokens, _ = eval_tokens(load_tokenizer(src), None)
    model = load_model(src, torch.float32, torch.device("cpu"))
    reference = perplexity(model, tokens, seq_len=128, max_tokens=2048)
    served = endpoint_perplexity(server.url, tokens, seq_len=128, max_tokens=2048)
    assert abs(served / reference - 1) < 0.01, (served, reference)

    # the same through the CLI, which also writes the numbers
    out = tmp_path / "eval.json"
    code, _, err = run_cli("eval", src, "--endpoint", server.url, "--seq-len", "128", "--max-tokens", "2048",
                           "--device", "cpu", "--json", out, capsys=capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["perplexity"]
    assert rows[0]["perplexity"] == pytest.approx(reference, rel=1e-6)
    assert rows[1]["perplexity"] == pytest.approx(served, rel=1e-6)

    # real lm-eval against the endpoint == the same multiple choice scored directly in transformers
    results = run_lm_eval_endpoint(server.url, "heapr_local", str(src), limit=12)
    tokenizer = load_tokenizer(src)
    for task in ("heapr_nextsent", "heapr_cloze"):
        assert results[task]["acc"] == pytest.approx(_choice_accuracy(model, tokenizer, task, 12)), task


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
