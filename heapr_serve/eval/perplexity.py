"""Held-out perplexity through transformers: the token stream, its windows, and exp(mean NLL)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from heapr_serve.calibrate.builtin_text import builtin_text
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
