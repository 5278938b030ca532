"""lm-eval `custom_dataset` loaders for the bundled tasks (the YAML files name them as
`!function task_data.nextsent`); lm-eval loads this file straight from its path, so it imports only
absolutely and lazily. The JSONL is built by `python -m tools.build_lm_eval_tasks`."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = {"heapr_nextsent": HERE / "heapr_nextsent.jsonl", "heapr_cloze": HERE / "heapr_cloze.jsonl"}


def _load(task: str):
    import datasets

    rows = [json.loads(line) for line in FILES[task].read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def nextsent(**_):
    """lm-eval `custom_dataset` for heapr_nextsent."""
    return _load("heapr_nextsent")


def cloze(**_):
    """lm-eval `custom_dataset` for heapr_cloze."""
    return _load("heapr_cloze")
