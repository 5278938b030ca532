"""`tools/gpu_check.py --dry-run`: the first-GPU acceptance pack runs end to end on CPU (tiny shapes,
the Triton interpreter, compress on a tiny FP8 DeepSeek-V3), so it cannot rot before a GPU comes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_checks_every_part_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--dry-run", "--out", str(out), "--workdir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["dry_run"] and report["failed"] == []
    kernel = report["kernel"]
    assert {(r["model"], r["variant"]) for r in kernel} == {(m, v) for m in ("tiny-a", "tiny-b") for v in ("dense", "pruned25", "pruned50")}
    assert all(r["ok"] and r["rel_err_vs_float64"] <= r["tolerance"] for r in kernel)
    assert all(r["kernel_over_grouped_mm"] > 0 for r in kernel if r["variant"] == "dense")
    assert all(r["pruned_over_scaled_dense"] > 0 and 0.2 < r["ratio"] < 0.6 for r in kernel if r["variant"] != "dense")
    c = report["compress"]
    assert c["ok"] and c["layers"] == 2 and c["shape"]["experts"] == 8
    assert 0 < c["output_bytes"] and len(c["loads_s"]) == 4  # each layer loaded twice: forward, then backward
    assert {s["step"] for s in c["steps"]} >= {"loss", "backward layer 0", "backward layer 1", "forward layer 1"}
    assert c["extrapolated_full_s"] > 0 and c["goal_s"] == 900
    assert not list(tmp_path.glob("gpu-check-*"))  # its random model and output are gone


def test_without_a_gpu_the_real_run_says_so_in_one_line(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real run would start")
    run = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--out", str(tmp_path / "x.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--dry-run" in run.stderr, run.stderr
