"""Quality of dense and pruned checkpoints: held-out perplexity through transformers and through a
served OpenAI-compatible endpoint, and lm-evaluation-harness tasks against that endpoint.

The endpoint perplexity sends the very token windows the transformers path scores (token ids, not
text, so no re-tokenisation can differ) to `/v1/completions` with `echo` and `logprobs`, and reads
back each prompt token's log-probability: the same number, computed by the serving stack users run.
lm-eval talks to the same endpoint through its `local-completions` model; the bundled local tasks
(heapr_serve/lm_eval_tasks) need no download, and any installed lm-eval task name works too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import typer

from heapr_serve.builtin_text import builtin_text
from heapr_serve.errors import HeaprError


def eval_tokens(tokenizer, text_path: str | None) -> tuple[torch.Tensor, str]:
    """The held-out token stream: the built-in test split, or a user's .txt file."""
    if text_path in (None, "builtin"):
        text, source = builtin_text("test"), "builtin:python-language-reference(test)"
    else:
        path = Path(text_path)
        if not path.is_file():
            raise HeaprError(f"--text {path}: no such file; pass a UTF-8 .txt file")
        text, source = path.read_text(encoding="utf-8", errors="strict"), str(path)
        if not text.strip():
            raise HeaprError(f"--text {path}: the file is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long), source


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens [n, seq_len]: the unit both perplexity paths score."""
    if max_tokens:
        tokens = tokens[:max_tokens]
    n_windows = len(tokens) // seq_len
    if n_windows == 0:
        raise HeaprError(f"held-out text has {len(tokens)} tokens, fewer than --seq-len {seq_len}; use more text or a smaller --seq-len")
    return tokens[: n_windows * seq_len].view(n_windows, seq_len)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 256, batch_size: int = 8, max_tokens: int | None = None,
               progress=None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens."""
    windows = eval_windows(tokens, seq_len, max_tokens)
    n_windows = len(windows)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
        if progress is not None:
            progress(len(batch))
    return math.exp(nll / count)


# --------------------------------------------------------------------------------------------------
# Through a served endpoint


def endpoint_base(url: str) -> str:
    """`http://host:port` from any of `host:port`, `http://host:port`, `.../v1`, `.../v1/completions`."""
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    for suffix in ("/v1/completions", "/v1"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def _request(method: str, url: str, endpoint: str, **kwargs):
    import httpx

    try:
        response = httpx.request(method, url, timeout=600.0, **kwargs)
    except httpx.HTTPError as err:
        raise HeaprError(f"--endpoint {endpoint}: no answer from {url} ({type(err).__name__}); start a server with `heapr-serve serve FOLDER` and pass its URL") from None
    if response.status_code != 200:
        raise HeaprError(f"--endpoint {endpoint}: {url} answered HTTP {response.status_code}: {response.text[:200]!r}")
    return response.json()


def endpoint_model_id(endpoint: str) -> str:
    """The id of the (first) model the endpoint serves, from `/v1/models`."""
    data = _request("GET", endpoint_base(endpoint) + "/v1/models", endpoint).get("data") or []
    if not data:
        raise HeaprError(f"--endpoint {endpoint}: /v1/models lists no model; is it an OpenAI-compatible completions server?")
    return data[0]["id"]


def endpoint_perplexity(endpoint: str, tokens: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
                        max_tokens: int | None = None, model: str | None = None, progress=None) -> float:
    """The same windows and NLL as `perplexity`, from the log-probabilities a served model returns for
    its prompt tokens (`/v1/completions` with echo + logprobs; the first token has none, as in
    transformers, where position 0 predicts token 1)."""
    windows = eval_windows(tokens, seq_len, max_tokens)
    model = model or endpoint_model_id(endpoint)
    url = endpoint_base(endpoint) + "/v1/completions"
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].tolist()
        body = {"model": model, "prompt": batch, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0.0}
        choices = sorted(_request("POST", url, endpoint, json=body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(batch):
            raise HeaprError(f"--endpoint {endpoint}: sent {len(batch)} prompts, got {len(choices)} choices back")
        for choice in choices:
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
            if not logprobs or len(logprobs) < seq_len:
                raise HeaprError(f"--endpoint {endpoint}: the server returned no prompt log-probabilities; it must support `echo` with `logprobs` (vLLM does)")
            nll -= sum(logprobs[1:seq_len])
            count += seq_len - 1
        if progress is not None:
            progress(len(batch))
    return math.exp(nll / count)


def lm_eval_tasks(tasks: str | list[str]) -> list[str]:
    """Task names from `a,b,c` (or a list); `heapr_local` is the bundled group."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise HeaprError("--tasks: give at least one lm-eval task name, e.g. heapr_local or heapr_nextsent,heapr_cloze")
    return names


def task_manager(names: list[str] | None = None):
    """lm-eval's task index with the bundled local tasks; only those (a second, not lm-eval's whole
    catalogue of thousands of YAML files) when every requested name is a bundled one."""
    from lm_eval.tasks import TaskManager

    from heapr_serve.lm_eval_tasks import LOCAL_GROUP, LOCAL_TASKS, TASKS_DIR

    local_only = names is not None and all(n in (LOCAL_GROUP, *LOCAL_TASKS) for n in names)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not local_only)


def _check_tasks(manager, names: list[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise HeaprError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)}; use heapr_local (bundled: heapr_nextsent, heapr_cloze) or a task `lm-eval ls tasks` lists")


def _import_lm_eval():
    from importlib.util import find_spec

    missing = [m for m in ("lm_eval", "tenacity", "accelerate") if find_spec(m) is None]
    if missing:
        raise HeaprError(f"--tasks needs lm-evaluation-harness with its API and HF models ({', '.join(missing)} missing); install heapr-serve[eval] (pip install 'lm-eval[api,hf]')")


def _flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results -> {task: {metric: value}} (filter suffix `,none` dropped, stderr kept)."""
    out = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and "," in key:
                metric, filt = key.split(",", 1)
                row[metric if filt == "none" else f"{metric}[{filt}]"] = float(value)
        if row:
            out[task] = row
    return out


def run_lm_eval_endpoint(endpoint: str, tasks: str | list[str], tokenizer: str | None = None, model: str | None = None,
                         limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                         max_length: int = 2048) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness against a served model with its `local-completions` model (token ids are
    sent, so the endpoint's scores are exact); returns {task: {metric: value}}."""
    _import_lm_eval()
    import lm_eval

    names = lm_eval_tasks(tasks)
    manager = task_manager(names)
    _check_tasks(manager, names)
    model = model or endpoint_model_id(endpoint)
    tokenizer = tokenizer or model
    if not Path(tokenizer).is_dir():
        raise HeaprError(f"--tokenizer: the endpoint serves {model!r}, which is not a local folder; pass --tokenizer FOLDER (the served model's tokenizer)")
    args = {
        "model": model, "base_url": endpoint_base(endpoint) + "/v1/completions", "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 1, "max_retries": 3,
        "batch_size": batch_size, "max_length": max_length,
    }
    results = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=names, task_manager=manager,
                                      limit=limit, num_fewshot=num_fewshot, bootstrap_iters=1000, log_samples=False)
    return _flatten_results(results)


def run_lm_eval_local(path: Path, tasks: str | list[str], limit: int | None = None, num_fewshot: int | None = None,
                      batch_size: int = 8, dtype=torch.float32, device=torch.device("cpu")) -> dict[str, dict[str, float]]:
    """The same tasks through transformers in this process (lm-eval's `hf` model on our loader, so
    pruned folders work without a server): the reference the endpoint numbers are checked against."""
    _import_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from heapr_serve.models import load_model, load_tokenizer

    names = lm_eval_tasks(tasks)
    manager = task_manager(names)
    _check_tasks(manager, names)
    lm = HFLM(pretrained=load_model(Path(path), dtype, device), tokenizer=load_tokenizer(Path(path)), batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                      bootstrap_iters=1000, log_samples=False)
    return _flatten_results(results)


# --------------------------------------------------------------------------------------------------
# Tables and the command


def perplexity_table(paths, text: str | None, seq_len: int, batch_size: int, max_tokens: int | None, dtype, device,
                     endpoint: str | None = None, tokenizer: str | None = None):
    """A rich table of held-out perplexity, parameters and change against the first row: one row per
    checkpoint (transformers) and one for the endpoint, if given."""
    from rich.table import Table

    from heapr_serve.checkpoint import count_source_params
    from heapr_serve.models import load_model, load_tokenizer
    from heapr_serve.progress import progress_bar

    served = endpoint_model_id(endpoint) if endpoint else None
    tokenizer_path = tokenizer or (paths[0] if paths else served)
    if not Path(tokenizer_path).is_dir():
        raise HeaprError(f"--tokenizer: the endpoint serves {served!r}, which is not a local folder; pass --tokenizer FOLDER or a checkpoint")
    tokens, source = eval_tokens(load_tokenizer(Path(tokenizer_path)), text)
    n_windows = len(eval_windows(tokens, seq_len, max_tokens))
    rows = []
    with progress_bar() as progress:
        for path in paths:
            model = load_model(Path(path), dtype, device)
            task = progress.add_task(f"perplexity {Path(path).name}", total=n_windows)
            ppl = perplexity(model, tokens, seq_len, batch_size, max_tokens, lambda n: progress.advance(task, n))
            rows.append((str(path), count_source_params(Path(path)), ppl))
            del model
        if endpoint:
            task = progress.add_task(f"perplexity {endpoint}", total=n_windows)
            ppl = endpoint_perplexity(endpoint, tokens, seq_len, batch_size, max_tokens, served, lambda n: progress.advance(task, n))
            params = count_source_params(Path(served)) if Path(served).is_dir() else None
            rows.append((f"{endpoint} ({served})", params, ppl))
    table = Table(title=f"held-out perplexity ({source}, {n_windows * seq_len} tokens, windows of {seq_len})")
    table.add_column("checkpoint", overflow="fold")
    for col in ("parameters", "perplexity", "vs first"):
        table.add_column(col, justify="right", no_wrap=True)
    base = rows[0][2]
    for path, params, ppl in rows:
        table.add_row(path, f"{params:,}" if params else "?", f"{ppl:.3f}", f"{(ppl / base - 1):+.2%}")
    table.rows_data = rows  # for callers that want the numbers
    return table


def lm_eval_table(results: dict[str, dict[str, float]], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "metric", "value", "stderr"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or "_stderr[" in metric:
                continue
            stderr = metrics.get(metric.replace("[", "_stderr[", 1) if "[" in metric else metric + "_stderr")
            table.add_row(task, metric, f"{value:.4f}", f"{stderr:.4f}" if isinstance(stderr, float) and stderr == stderr else "")
    return table


def eval_command(
    checkpoints: Optional[list[Path]] = typer.Argument(None, help="Checkpoint folders scored through transformers (dense or pruned)."),
    endpoint: Optional[str] = typer.Option(None, help="URL of a running OpenAI-compatible server (e.g. http://localhost:8000): perplexity through it."),
    tasks: Optional[str] = typer.Option(None, help="lm-eval tasks run against --endpoint, comma-separated: heapr_local (bundled, offline) or any installed task."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder for --endpoint (default: the first checkpoint, or the served folder)."),
    limit: Optional[int] = typer.Option(None, help="lm-eval: at most N documents per task."),
    num_fewshot: Optional[int] = typer.Option(None, help="lm-eval: few-shot examples (default: the task's own)."),
    text: str = typer.Option(None, help="Held-out .txt file for perplexity (default: built-in held-out text)."),
    seq_len: int = typer.Option(256, help="Tokens per perplexity window."),
    batch_size: int = typer.Option(8, help="Windows per forward pass / per request."),
    max_tokens: int = typer.Option(None, help="Score at most this many held-out tokens."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (transformers)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N (transformers)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every number to this JSON file."),
) -> None:
    """Held-out perplexity (transformers and/or a served endpoint) and lm-eval tasks against the endpoint."""
    from heapr_serve.models import pick_device, pick_dtype, resolve_model
    from heapr_serve.progress import console

    if tasks is not None and not endpoint:
        raise HeaprError("--tasks runs lm-eval against a served model: also pass --endpoint URL (start one with `heapr-serve serve FOLDER`)")
    if not checkpoints and not endpoint:
        raise HeaprError("nothing to evaluate: pass checkpoint folders and/or --endpoint URL")
    if tasks is not None:
        _import_lm_eval()
        names = lm_eval_tasks(tasks)
        _check_tasks(task_manager(names), names)  # before any model is loaded
    if limit is not None and limit < 1:
        raise HeaprError(f"--limit must be at least 1 (got {limit})")
    torch_dtype, torch_device = pick_dtype(dtype), pick_device(device)
    paths = [resolve_model(str(p)) for p in checkpoints or []]
    if tokenizer is None and paths:
        tokenizer = str(paths[0])
    table = perplexity_table(paths, text, seq_len, batch_size, max_tokens, torch_dtype, torch_device, endpoint, tokenizer)
    console.print(table)
    report = {"perplexity": [{"checkpoint": p, "parameters": n, "perplexity": ppl} for p, n, ppl in table.rows_data]}
    if tasks is not None:
        results = run_lm_eval_endpoint(endpoint, tasks, tokenizer, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
        console.print(lm_eval_table(results, f"lm-eval through {endpoint}"))
        report["lm_eval"] = results
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")


