"""Perplexity on held-out text, through transformers, for one or more checkpoints side by side."""

from __future__ import annotations

import math
from pathlib import Path

import torch

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


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 256, batch_size: int = 8, max_tokens: int | None = None,
               progress=None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens."""
    if max_tokens:
        tokens = tokens[:max_tokens]
    n_windows = len(tokens) // seq_len
    if n_windows == 0:
        raise HeaprError(f"held-out text has {len(tokens)} tokens, fewer than --seq-len {seq_len}; use more text or a smaller --seq-len")
    windows = tokens[: n_windows * seq_len].view(n_windows, seq_len)
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


def perplexity_table(paths, text: str | None, seq_len: int, batch_size: int, max_tokens: int | None, dtype, device):
    """A rich table of held-out perplexity, parameters and change against the first checkpoint."""
    from rich.table import Table

    from heapr_serve.checkpoint import count_source_params
    from heapr_serve.models import load_model, load_tokenizer
    from heapr_serve.progress import progress_bar

    tokens, source = eval_tokens(load_tokenizer(Path(paths[0])), text)
    rows = []
    with progress_bar() as progress:
        for path in paths:
            model = load_model(Path(path), dtype, device)
            n_windows = min(len(tokens), max_tokens or len(tokens)) // seq_len
            task = progress.add_task(f"perplexity {Path(path).name}", total=n_windows)
            ppl = perplexity(model, tokens, seq_len, batch_size, max_tokens, lambda n: progress.advance(task, n))
            rows.append((str(path), count_source_params(Path(path)), ppl))
            del model
    table = Table(title=f"held-out perplexity ({source}, {min(len(tokens), max_tokens or len(tokens))} tokens, windows of {seq_len})")
    table.add_column("checkpoint", overflow="fold")
    for col in ("parameters", "perplexity", "vs first"):
        table.add_column(col, justify="right", no_wrap=True)
    base = rows[0][2]
    for path, params, ppl in rows:
        table.add_row(path, f"{params:,}", f"{ppl:.3f}", f"{(ppl / base - 1):+.2%}")
    table.rows_data = rows  # for callers that want the numbers
    return table


def eval_command(
    checkpoints: list[Path],
    text: str = None,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int = None,
    dtype: str = "float32",
    device: str = "auto",
) -> None:
    """Held-out perplexity of one or more checkpoints (dense or pruned), side by side."""
    from heapr_serve.models import pick_device, pick_dtype, resolve_model
    from heapr_serve.progress import console

    torch_dtype, torch_device = pick_dtype(dtype), pick_device(device)
    paths = [resolve_model(str(p)) for p in checkpoints]
    console.print(perplexity_table(paths, text, seq_len, batch_size, max_tokens, torch_dtype, torch_device))
