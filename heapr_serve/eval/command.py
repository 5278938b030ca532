"""`heapr-serve eval`: perplexity tables (transformers and/or an endpoint) and lm-eval results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from heapr_serve.errors import HeaprError
from heapr_serve.preflight import check_output, staged_file
from heapr_serve.eval.endpoint import check_endpoint_url, endpoint_model_id, endpoint_perplexity
from heapr_serve.eval.harness import _check_tasks, _import_lm_eval, lm_eval_tasks, run_lm_eval_endpoint, task_manager
from heapr_serve.eval.perplexity import eval_tokens, eval_windows, perplexity


def perplexity_table(paths, text: str | None, seq_len: int, batch_size: int, max_tokens: int | None, dtype, device,
                     endpoint: str | None = None, tokenizer: str | None = None):
    """A rich table of held-out perplexity, parameters and change against the first row: one row per
    checkpoint (transformers) and one for the endpoint, if given."""
    from rich.table import Table

    from heapr_serve.checkpoint.format import count_source_params
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


def _check_numbers(limit, num_fewshot, seq_len: int, batch_size: int, max_tokens) -> None:
    for flag, value, least in (("--limit", limit, 1), ("--num-fewshot", num_fewshot, 0), ("--seq-len", seq_len, 2),
                               ("--batch-size", batch_size, 1), ("--max-tokens", max_tokens, 1)):
        if value is not None and value < least:
            raise HeaprError(f"{flag} must be at least {least} (got {value})")
    if max_tokens is not None and max_tokens < seq_len:
        raise HeaprError(f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}; raise --max-tokens or lower --seq-len")


def _check_paths(paths: list[Path], endpoint: str | None, tokenizer: str | None, text: str | None, seq_len: int,
                 json_out: Path | None) -> None:
    """Everything about the paths and the endpoint that can be checked before a model is loaded."""
    from heapr_serve.checkpoint.format import read_config
    from heapr_serve.score.memory import check_context

    if endpoint is not None:
        check_endpoint_url(endpoint)
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise HeaprError(f"--tokenizer {tokenizer}: no such folder; pass a model folder with tokenizer files")
    if text not in (None, "builtin") and not Path(text).is_file():
        raise HeaprError(f"--text {text}: no such file; pass a UTF-8 .txt file")
    for path in paths:
        check_context(read_config(path), seq_len, str(path / "config.json"))
    if json_out is not None:
        check_output("--json", json_out, kind="file")


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
    greedy: Optional[Path] = typer.Option(None, "--greedy", help="Prompt file (.txt, one per line): greedy answers of each "
                                          "checkpoint compared token for token with the first checkpoint's."),
    greedy_tokens: int = typer.Option(16, "--greedy-tokens", min=1, help="Tokens each greedy answer has (EOS ignored)."),
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
    _check_numbers(limit, num_fewshot, seq_len, batch_size, max_tokens)
    torch_dtype, torch_device = pick_dtype(dtype), pick_device(device)
    paths = [resolve_model(str(p)) for p in checkpoints or []]
    _check_paths(paths, endpoint, tokenizer, text, seq_len, json_out)
    prompts = None
    if greedy is not None:
        from heapr_serve.eval.agreement import read_prompts

        if len(paths) < 2:
            raise HeaprError("--greedy compares checkpoints with the first one: pass at least two checkpoint folders")
        prompts = read_prompts(greedy)
    if tokenizer is None and paths:
        tokenizer = str(paths[0])
    table = perplexity_table(paths, text, seq_len, batch_size, max_tokens, torch_dtype, torch_device, endpoint, tokenizer)
    console.print(table)
    report = {"perplexity": [{"checkpoint": p, "parameters": n, "perplexity": ppl} for p, n, ppl in table.rows_data]}
    if prompts is not None:
        from heapr_serve.eval.agreement import agreement_table, greedy_agreement

        rows = greedy_agreement(paths, prompts, greedy_tokens, Path(tokenizer), torch_dtype, torch_device)
        console.print(agreement_table(rows))
        report["greedy_agreement"] = rows
    if tasks is not None:
        results = run_lm_eval_endpoint(endpoint, tasks, tokenizer, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
        console.print(lm_eval_table(results, f"lm-eval through {endpoint}"))
        report["lm_eval"] = results
    if json_out is not None:
        with staged_file("--json", json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
