"""Calibration data: the built-in text by default, or the user's `.txt` / `.jsonl` files or a folder.

Text is tokenised, documents are joined with the end-of-text token, and `nsamples` windows of
`seq_len` tokens are drawn at seeded random offsets (as the paper does with WikiText-2). Pre-tokenised
`input_ids` records are used exactly as given, one sample each. Every problem is a HeaprError that
names the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from heapr_serve.calibrate.builtin_text import builtin_text
from heapr_serve.errors import HeaprError

BUILTIN = "builtin"


@dataclass
class CalibrationSet:
    samples: list[torch.Tensor]  # 1-D token id tensors
    source: str
    seq_len: int  # the longest sample; fixes the loss normalisation

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for s in self.samples:
            h.update(s.to(torch.int64).numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    def batches(self, batch_size: int, pad_id: int):
        """(input_ids, attention_mask, labels) batches, right-padded; labels are -100 on padding."""
        for i in range(0, len(self.samples), batch_size):
            chunk = self.samples[i : i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, sample in enumerate(chunk):
                ids[row, : len(sample)] = sample
                mask[row, : len(sample)] = 1
            yield ids, mask, ids.masked_fill(mask == 0, -100)

    def describe(self) -> dict:
        return {"source": self.source, "nsamples": len(self.samples), "seq_len": self.seq_len,
                "tokens": self.num_tokens, "sha256": self.sha256}


def _read_records(file: Path) -> tuple[list[str], list[list[int]]]:
    """Texts and pre-tokenised id lists from one .txt or .jsonl file."""
    try:
        content = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HeaprError(f"--calib {file}: not UTF-8 text") from None
    if not content.strip():
        raise HeaprError(f"--calib {file}: the file is empty; give it text or remove it")
    if file.suffix == ".txt":
        return [content], []
    texts, ids = [], []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise HeaprError(f"--calib {file}:{lineno}: not valid JSON; each line must be an object with `text` or `input_ids`") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        elif isinstance(record, dict) and isinstance(record.get("input_ids"), list):
            if not record["input_ids"] or not all(isinstance(t, int) for t in record["input_ids"]):
                raise HeaprError(f"--calib {file}:{lineno}: `input_ids` must be a non-empty list of integers")
            ids.append(record["input_ids"])
        else:
            raise HeaprError(f"--calib {file}:{lineno}: each line must be an object with a `text` string or an `input_ids` list")
    if texts and ids:
        raise HeaprError(f"--calib {file}: mixes `text` and `input_ids` records; use one kind per calibration set")
    return texts, ids


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise HeaprError(f"--calib {path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise HeaprError(f"--calib {path}: the folder has no .txt or .jsonl files")
        return files
    if path.suffix not in (".txt", ".jsonl"):
        raise HeaprError(f"--calib {path}: unsupported file type; use .txt, .jsonl (text or input_ids) or a folder of them")
    return [path]


def load_calibration(calib: str | None, tokenizer, nsamples: int, seq_len: int, seed: int, vocab_size: int) -> CalibrationSet:
    if nsamples < 1:
        raise HeaprError(f"--nsamples must be at least 1 (got {nsamples})")
    if seq_len < 2:
        raise HeaprError(f"--seq-len must be at least 2 (got {seq_len})")
    texts: list[str] = []
    ids: list[list[int]] = []
    if calib in (None, BUILTIN):
        source = "builtin:python-language-reference(train)"
        texts = [builtin_text("train")]
    else:
        path = Path(calib)
        source = str(path)
        for file in _files(path):
            t, i = _read_records(file)
            texts += t
            ids += i
        if texts and ids:
            raise HeaprError(f"--calib {path}: mixes text and pre-tokenised files; use one kind per calibration set")

    if ids:
        if len(ids) < nsamples:
            raise HeaprError(f"--calib {source}: has {len(ids)} pre-tokenised samples, fewer than --nsamples {nsamples}; add samples or lower --nsamples")
        for n, sample in enumerate(ids[:nsamples]):
            bad = [t for t in sample if t < 0 or t >= vocab_size]
            if bad:
                raise HeaprError(f"--calib {source}: sample {n} has token id {bad[0]} outside the vocabulary (0..{vocab_size - 1}); re-tokenise with this model's tokenizer")
            if len(sample) < 2:
                raise HeaprError(f"--calib {source}: sample {n} has fewer than 2 tokens; nothing to predict")
        samples = [torch.tensor(s, dtype=torch.long) for s in ids[:nsamples]]
        return CalibrationSet(samples, source, max(len(s) for s in samples))

    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
    if len(stream) < seq_len + 1:
        raise HeaprError(f"--calib {source}: only {len(stream)} tokens, fewer than --seq-len {seq_len}; give more text or a smaller --seq-len")
    tokens = torch.tensor(stream, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (nsamples,), generator=generator)
    samples = [tokens[s : s + seq_len] for s in starts.tolist()]
    return CalibrationSet(samples, source, seq_len)
