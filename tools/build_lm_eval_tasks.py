"""Build the JSONL behind the local lm-eval tasks from the held-out built-in text.

The source is `builtin_text("test")`, the held-out split that no calibration or training sees. Prose
paragraphs (mostly letters, ending in full sentences) are cut into sentences; code, grammar rules,
interactive examples and headings are skipped.

- next sentence: context = one or two sentences, choices = the true next sentence of the same
  paragraph and three sentences of similar length from other paragraphs (seeded), shuffled.
- cloze: context = the previous sentence and the sentence without its last word; choices = that word
  and three other sentence-final words of the held-out text (seeded), shuffled. (Greedy exact-word
  accuracy, LAMBADA's metric, is 0 for every checkpoint of a model as small as the bundled one, so
  it could not tell methods apart; the four-way choice can.)

The JSONL files are committed (pydoc's text changes between CPython releases); regenerate them with
`python -m tools.build_lm_eval_tasks`; lm-eval reads them through `heapr_serve/eval/lm_eval_tasks/task_data.py`.
"""

from __future__ import annotations

import json
import random
import re

from heapr_serve.eval.lm_eval_tasks.task_data import FILES

SEED = 1234
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"”][.!?])\s+(?=[A-Z\"“])")


def _prose(block: str) -> list[str]:
    """The sentences of one prose block, or [] for code, grammar rules, examples and headings."""
    lines = [line.strip() for line in block.strip("\n").split("\n")]
    if ">>>" in block or "::=" in block or any(re.fullmatch(r"[*=\-]{3,}", line) for line in lines):
        return []
    prose = re.sub(r"\s+", " ", re.sub(r"^(\*|\d+\.)\s+", "", " ".join(lines).strip()))
    if len(prose) < 40 or sum(c.isalpha() or c.isspace() for c in prose) < 0.85 * len(prose):
        return []
    return [s for s in (s.strip() for s in _SENTENCE_END.split(prose)) if 25 <= len(s) <= 300 and s[-1] in ".!?"]


def _paragraphs(text: str) -> list[list[str]]:
    """Runs of consecutive prose blocks (a passage a reader reads in one go) as lists of sentences."""
    runs, current = [], []
    for block in text.split("\n\n"):
        sentences = _prose(block)
        if sentences:
            current += sentences
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def nextsent_rows(text: str, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    paragraphs = _paragraphs(text)
    pool = [(p, s) for p, sentences in enumerate(paragraphs) for s in sentences]
    rows = []
    for p, sentences in enumerate(paragraphs):
        for i in range(1, len(sentences)):
            answer = sentences[i]
            context = " ".join(sentences[max(0, i - 2) : i])
            others = sorted((abs(len(s) - len(answer)), s) for q, s in pool if q != p and s != answer)
            nearest = [s for _, s in others[:20]]
            distractors = rng.sample(nearest, 3)
            choices = distractors + [answer]
            rng.shuffle(choices)
            rows.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return rows


def cloze_rows(text: str, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for sentences in _paragraphs(text):
        for i, sentence in enumerate(sentences):
            words = sentence[:-1].split(" ")
            last = words[-1]
            if len(words) < 6 or not re.fullmatch(r"[A-Za-z]{3,}", last):
                continue
            prefix = " ".join(words[:-1])
            items.append(((sentences[i - 1] + " " + prefix) if i > 0 else prefix, last))
    vocabulary = sorted({word for _, word in items})
    rows = []
    for context, word in items:
        choices = rng.sample([w for w in vocabulary if w.lower() != word.lower()], 3) + [word]
        rng.shuffle(choices)
        rows.append({"context": context, "target": word, "choices": choices, "label": choices.index(word)})
    return rows


def build() -> dict[str, int]:
    """Write both JSONL files from the held-out built-in text; returns rows per task."""
    from heapr_serve.calibrate.builtin_text import builtin_text

    text = builtin_text("test")
    counts = {}
    for task, rows in (("heapr_nextsent", nextsent_rows(text)), ("heapr_cloze", cloze_rows(text))):
        FILES[task].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        counts[task] = len(rows)
    return counts


if __name__ == "__main__":
    for name, n in build().items():
        print(f"{FILES[name]}: {n} rows")
