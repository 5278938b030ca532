"""lm-evaluation-harness tasks, against a served endpoint (`local-completions`) or in this process.

The bundled local tasks (heapr_serve/eval/lm_eval_tasks) need no download, and any installed lm-eval
task name works too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from heapr_serve.errors import HeaprError
from heapr_serve.eval.endpoint import endpoint_base, endpoint_model_id


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

    from heapr_serve.eval.lm_eval_tasks import LOCAL_GROUP, LOCAL_TASKS, TASKS_DIR

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
