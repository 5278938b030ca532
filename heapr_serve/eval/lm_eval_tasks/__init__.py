"""Small lm-evaluation-harness tasks over local JSONL, built from the held-out built-in text.

Hub data sets are out of reach on many machines (and in CI), so these tasks ship with the package:
`heapr_nextsent` (pick the true next sentence among four) and `heapr_cloze` (predict a sentence's
final word, LAMBADA style), grouped as `heapr_local`. Pass `TASKS_DIR` as lm-eval's include path.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("heapr_nextsent", "heapr_cloze")
LOCAL_GROUP = "heapr_local"
