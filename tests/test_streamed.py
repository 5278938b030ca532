"""Calibrating models bigger than the machine: streamed layer by layer, data parallel, resumable.

Each must give the statistics of the plain in-memory pass: streamed to 5e-5 on every family (float32 summation order),
2 gloo ranks to 1 rank (identical widths), and a killed then resumed run exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from heapr_serve.calibrate.datasets import CalibrationSet
from heapr_serve.score.calibration_pass import collect, collect_statistics
from heapr_serve.score.checkpointing import partial_folder
from heapr_serve.score.stats import REAP_KEY, ExpertStats
from heapr_serve.score.streamed import StreamedPass

from conftest import FAMILIES, ROOT, run_cli

FAST = ["--nsamples", "8", "--seq-len", "32", "--batch-size", "2"]


def _calibration() -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 4096, (n,), generator=g) for n in (48, 48, 30, 41, 48)]  # ragged: padding counts
    return CalibrationSet(samples, "random", 48)


def _max_rel(a: ExpertStats, b: ExpertStats) -> float:
    worst = 0.0
    for layer in a.act_sq:
        assert torch.equal(a.tokens[layer], b.tokens[layer]), layer
        for kind in ("act_sq", "grad_sq", "fisher"):
            x, y = getattr(a, kind)[layer].double(), getattr(b, kind)[layer].double()
            nonzero = x != 0
            assert torch.equal(nonzero, y != 0)
            worst = max(worst, ((x - y).abs()[nonzero] / x.abs()[nonzero]).max().item())
        ra = torch.tensor(a.metadata[REAP_KEY][str(layer)], dtype=torch.float64)
        rb = torch.tensor(b.metadata[REAP_KEY][str(layer)], dtype=torch.float64)
        worst = max(worst, ((ra - rb).abs() / ra.abs().clamp(min=1e-30)).max().item())
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_statistics_equal_in_memory(tiny_models, family, tmp_path):
    calib = _calibration()
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32)
    in_memory = collect_statistics(model, calib.batches(2, pad_id=0), loss_scale=96.0)
    # a loss chunk smaller than a batch, and the recomputation one sequence at a time: the chunked
    # cross-entropy and the per-sequence graphs must give the statistics of the whole batch
    streamed = collect(StreamedPass(tiny_models[family], torch.float32, torch.device("cpu"), loss_chunk_tokens=37,
                                    recompute_tokens=40), calib.batches(2, pad_id=0), 96.0)
    assert sorted(streamed.act_sq) == sorted(in_memory.act_sq)
    # float32, different summation orders (chunked loss, per-sequence graphs): 1.2e-5 at worst measured
    # (minimax_m2, on an Intel Xeon; ~1e-6 elsewhere)
    assert _max_rel(in_memory, streamed) < 5e-5
    # saved layer inputs on disk instead of host memory: the same numbers, and no file left behind
    on_disk = collect(StreamedPass(tiny_models[family], torch.float32, torch.device("cpu"), loss_chunk_tokens=37,
                                  recompute_tokens=40, activations_dir=tmp_path / "acts"),
                      calib.batches(2, pad_id=0), 96.0)
    assert _max_rel(streamed, on_disk) == 0.0
    assert not (tmp_path / "acts").exists()  # the folder it made for them is gone too


def _widths(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["heapr"]["expert_widths"]


def test_compress_streamed_writes_the_in_memory_checkpoint(tiny_models, tmp_path, capsys):
    src = tiny_models["deepseek_v3"]  # dense first layer, shared experts, grouped routing
    assert run_cli("compress", src, "-o", tmp_path / "mem", "--no-streamed", *FAST, capsys=capsys)[0] == 0
    code, _, err = run_cli("compress", src, "-o", tmp_path / "str", "--streamed", *FAST, capsys=capsys)
    assert code == 0 and "streamed layer by layer" in err
    assert _widths(tmp_path / "mem") == _widths(tmp_path / "str")
    assert _max_rel(ExpertStats.load(tmp_path / "mem"), ExpertStats.load(tmp_path / "str")) < 1e-5


def test_compress_streams_by_itself_when_the_model_would_not_fit(tiny_models, tmp_path, capsys, monkeypatch):
    import heapr_serve.score.memory as memory

    monkeypatch.setattr(memory, "host_available", lambda: 12 << 20)  # a machine with 12 MiB free
    code, _, err = run_cli("compress", tiny_models["qwen3_moe"], "-o", tmp_path / "o", *FAST, capsys=capsys)
    assert code == 0 and "streamed layer by layer: in memory it would need" in err
    monkeypatch.setattr(memory, "host_available", lambda: 6 << 20)  # not even streaming fits: refused, with the way out
    code, _, err = run_cli("compress", tiny_models["qwen3_moe"], "-o", tmp_path / "p", *FAST, capsys=capsys)
    assert code == 2 and "--batch-size 1" in err and "MiB streamed" in err and err.strip().count("\n") == 0
    monkeypatch.setattr(memory, "host_available", lambda: 1 << 20)  # nothing fits: said so
    code, _, err = run_cli("compress", tiny_models["qwen3_moe"], "-o", tmp_path / "p", *FAST, capsys=capsys)
    assert code == 2 and "more memory" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "p").exists()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_two_gloo_ranks_equal_one(tiny_models, tmp_path, capsys):
    """The statistics, and the --reconstruct re-fit (Gram matrices summed over ranks), of two ranks."""
    src = tiny_models["qwen2_moe"]
    assert run_cli("compress", src, "-o", tmp_path / "one", *FAST, "--reconstruct", capsys=capsys)[0] == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "heapr_serve", "compress",
                           str(src), "-o", str(tmp_path / "two"), *FAST, "--reconstruct"], capture_output=True, text=True, env=_env(),
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 ranks" in proc.stderr
    assert _widths(tmp_path / "one") == _widths(tmp_path / "two")
    assert _max_rel(ExpertStats.load(tmp_path / "one"), ExpertStats.load(tmp_path / "two")) < 1e-5
    assert not partial_folder(tmp_path / "two").exists()
    from safetensors.torch import load_file

    one, two = ({n: t for f in sorted((tmp_path / run).glob("model*.safetensors")) for n, t in load_file(str(f)).items()} for run in ("one", "two"))
    assert one.keys() == two.keys()
    downs = [n for n in one if n.endswith("down_proj.weight") and ".experts." in n]
    assert downs and all(torch.allclose(one[n], two[n], rtol=1e-4, atol=1e-6) for n in downs)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["heapr"]["reconstruct"]["experts_refit"] > 0
    assert not list(tmp_path.glob(".*heapr-refit*"))


def test_bad_input_under_torchrun_is_said_once(tiny_models, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "heapr_serve", "compress",
                           str(tiny_models["qwen3_moe"]), "-o", str(tmp_path / "x"), "--ratio", "2"],
                          capture_output=True, text=True, env=_env(), timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and "--ratio" in proc.stderr
    assert not (tmp_path / "x").exists()


def _compress(*args) -> subprocess.CompletedProcess:
    """The real command in its own process (all runs compared bit for bit must share the thread count)."""
    return subprocess.run([sys.executable, "-m", "heapr_serve", "compress", *map(str, args)], capture_output=True,
                          text=True, env=_env(), timeout=300)


@pytest.mark.parametrize("mode", ["--no-streamed", "--streamed"])
def test_killed_then_resumed_equals_uninterrupted(tiny_models, tmp_path, mode):
    src = tiny_models["mixtral"]
    flags = ["--nsamples", "24", "--seq-len", "32", "--batch-size", "1", "--checkpoint-every", "1", mode]
    assert _compress(src, "-o", tmp_path / "whole", *flags).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "heapr_serve", "compress", str(src), "-o", str(out), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 120
    state = partial_folder(out)
    while not any(state.glob("*.safetensors")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(state.glob("*.safetensors")) and not out.exists(), "the run ended before it could be killed"

    # without --resume the checkpoint is not silently thrown away
    # (refusals compute nothing, so they run in-process: no second interpreter start)
    code, _, err = run_cli("compress", src, "-o", out, *flags)
    assert code == 2 and "--resume" in err
    # other flags: refused, the checkpoint stays
    code, _, err = run_cli("compress", src, "-o", out, *flags, "--seed", "1", "--resume")
    assert code == 2 and "calibration_sha256" in err and any(state.glob("*.safetensors"))

    resumed_run = _compress(src, "-o", out, *flags, "--resume")
    assert resumed_run.returncode == 0, resumed_run.stderr[-2000:]
    done = int(resumed_run.stderr.split("resuming from a checkpoint: ")[1].split(" of ")[0])
    assert 0 < done < 24
    whole, resumed = ExpertStats.load(tmp_path / "whole"), ExpertStats.load(out)
    for layer in whole.act_sq:  # the same additions in the same order: bit for bit
        assert torch.equal(whole.act_sq[layer], resumed.act_sq[layer])
        assert torch.equal(whole.grad_sq[layer], resumed.grad_sq[layer])
        assert torch.equal(whole.tokens[layer], resumed.tokens[layer])
        assert torch.equal(whole.fisher[layer], resumed.fisher[layer])
    assert whole.metadata[REAP_KEY] == resumed.metadata[REAP_KEY]
    assert _widths(tmp_path / "whole") == _widths(out)
    assert not state.exists()
