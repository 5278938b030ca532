"""Greedy agreement of checkpoints: does the pruned model answer like the dense one, token for token?

Each checkpoint after the first decodes every prompt greedily for exactly `tokens` tokens (EOS ignored,
as `bench` and the A/B proxy's shadow probes pin lengths), in transformers; each answer is compared
with the first checkpoint's: identical or not, and where they first differ. The same comparison the
proxy's shadow mode makes of two live arms (heapr_serve.ab.shadow), made offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from heapr_serve.errors import HeaprError


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise HeaprError(f"--greedy {path}: no such file; give a .txt file with one prompt per line")
    prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not prompts:
        raise HeaprError(f"--greedy {path}: no prompt in it; give one prompt per line")
    return prompts


def greedy_answers(model, tokenizer, prompts: list[str], tokens: int, device) -> list[list[int]]:
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            answers.append(out[0, ids.shape[1]:].tolist())
    return answers


def greedy_agreement(paths: list[Path], prompts: list[str], tokens: int, tokenizer_path: Path, dtype, device) -> list[dict]:
    """One row per checkpoint after the first: identical answers, first differing positions."""
    from heapr_serve.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    answers = []
    for path in paths:
        model = load_model(Path(path), dtype, device)
        answers.append(greedy_answers(model, tokenizer, prompts, tokens, device))
        del model
    rows = []
    for path, theirs in zip(paths[1:], answers[1:]):
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(answers[0], theirs)]
        rows.append({"checkpoint": str(path), "against": str(paths[0]), "prompts": len(prompts), "tokens": tokens,
                     "identical": sum(f is None for f in first), "first_diff": first})
    return rows


def agreement_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="greedy agreement with the first checkpoint (transformers)")
    table.add_column("checkpoint", overflow="fold")
    for col in ("identical answers", "first differing token (mean, where they differ)"):
        table.add_column(col, justify="right")
    for r in rows:
        diffs = [f for f in r["first_diff"] if f is not None]
        table.add_row(r["checkpoint"], f"{r['identical']}/{r['prompts']} ({r['identical'] / r['prompts']:.0%})",
                      f"{sum(diffs) / len(diffs):.1f}" if diffs else "-")
    return table
