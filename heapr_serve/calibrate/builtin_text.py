"""The offline default text: the Python language reference that ships inside every CPython.

`pydoc_data.topics` holds about 460 kB of English prose and code (the reference pages `help()`
shows). No download is needed, so the default calibration set, the held-out perplexity set and the
example model's training text are the same on every machine. The text (topics in sorted order) is cut
at paragraph breaks into blocks of about 4 kB; every tenth block is held out for evaluation, the rest
is for training and calibration.
"""

from __future__ import annotations

import hashlib

HELD_OUT_EVERY = 10


BLOCK_CHARS = 4000


def _blocks() -> list[str]:
    from pydoc_data.topics import topics

    blocks, current = [], []
    size = 0
    for _, text in sorted(topics.items()):
        for paragraph in text.split("\n\n"):
            current.append(paragraph)
            size += len(paragraph) + 2
            if size >= BLOCK_CHARS:
                blocks.append("\n\n".join(current))
                current, size = [], 0
    if current:
        blocks.append("\n\n".join(current))
    return blocks


def builtin_text(split: str) -> str:
    """'train' (calibration and training) or 'test' (held-out evaluation) text."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    held_out = split == "test"
    parts = [b for i, b in enumerate(_blocks()) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out]
    return "\n\n".join(parts)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
