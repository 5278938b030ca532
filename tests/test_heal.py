"""`--heal`: healing lowers every pruned layer's reconstruction error on tokens it never saw (measured
here with transformers on fresh text, not from the numbers the run reports), streamed and in-memory
calibration heal alike, ratio 0 changes nothing, an interrupted heal resumes at its next layer with
the same result, `apply --heal` re-reads the recorded calibration, two gloo ranks heal together, and
bad heal flags are refused in one line before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import heapr_serve  # noqa: F401  (registers the pruned-checkpoint loader)
from heapr_serve.calibrate.datasets import load_calibration
from heapr_serve.models import load_tokenizer
from heapr_serve.score.checkpointing import partial_folder

from conftest import EXAMPLE_MODEL, ROOT, run_cli
from test_reconstruct import _tensors

FAST = ["--nsamples", "16", "--seq-len", "64", "--batch-size", "4"]
RATIO = "0.75"  # every layer loses enough to heal (at 0.5 the first keeps 74 % and has almost nothing to regain)
# 120 steps of 256 tokens, one rank or two (--heal-epochs' default 4 would take 15 over these ~900 training tokens)
HEAL = ["--heal", "--heal-steps", "120", "--heal-epochs", "100", "--heal-batch-tokens", "256"]


def _heapr(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["heapr"]


@pytest.fixture(scope="module")
def healed(tiny_models, tmp_path_factory):
    src = EXAMPLE_MODEL  # a trained model: healing a random one has little to learn that generalises
    root = tmp_path_factory.mktemp("heal")
    for name, flags in {"plain": [], "healed": HEAL}.items():
        code, _, err = run_cli("compress", src, "-o", root / name, "--ratio", RATIO, *FAST, *flags)
        assert code == 0, err[-3000:]
    return src, root


def _block_errors(dense_folder: Path, pruned_folder: Path, tokens: torch.Tensor) -> dict[int, float]:
    """Per MoE layer: ||pruned block(x) - dense block(x)||^2 / ||dense block(x)||^2 with x the pruned
    model's own inputs to that block (what healing targets), on `tokens`."""
    dense = AutoModelForCausalLM.from_pretrained(dense_folder, dtype=torch.float32)
    pruned = AutoModelForCausalLM.from_pretrained(pruned_folder, dtype=torch.float32)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, layer in enumerate(pruned.model.layers) if hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        pruned(tokens)
        for h in hooks:
            h.remove()
        errors = {}
        for i, x in inputs.items():
            target = dense.model.layers[i].mlp(x)
            errors[i] = float((pruned.model.layers[i].mlp(x) - target).pow(2).sum() / target.pow(2).sum())
    return errors


def test_heal_lowers_every_layers_error_on_unseen_tokens(healed):
    src, root = healed
    tokenizer = load_tokenizer(src)
    vocab = json.loads((Path(src) / "config.json").read_text())["vocab_size"]
    fresh = load_calibration(None, tokenizer, 4, 64, 7, vocab)  # other windows than the calibration's (seed 0)
    tokens = torch.stack([torch.as_tensor(s) for s in fresh.samples])
    plain, heal = _block_errors(src, root / "plain", tokens), _block_errors(src, root / "healed", tokens)
    assert plain.keys() == heal.keys() and plain
    for layer in plain:
        assert heal[layer] < plain[layer], (layer, plain[layer], heal[layer])
    record = _heapr(root / "healed")["heal"]
    assert record["steps"] == 120 and record["router"] is True and record["reconstruct_start"] is False
    assert all(r["held_out_after"] < r["held_out_before"] for r in record["layers"].values())
    assert _heapr(root / "plain")["expert_widths"] == _heapr(root / "healed")["expert_widths"]  # only values change
    card = (root / "healed" / "README.md").read_text()
    assert "healed (`--heal`" in card and "healed" not in (root / "plain" / "README.md").read_text()
    # every kept tensor and the router changed; nothing else did
    a, b = _tensors(root / "plain"), _tensors(root / "healed")
    assert a.keys() == b.keys()
    changed = {n for n in a if not torch.equal(a[n], b[n])}
    assert any(".experts." in n for n in changed) and any(n.endswith("mlp.gate.weight") for n in changed)
    assert all(".experts." in n or n.endswith("mlp.gate.weight") for n in changed), sorted(changed)[:5]
    assert not partial_folder(root / "healed").exists()


def test_streamed_and_in_memory_heal_agree(healed, tmp_path):
    src, root = healed
    code, _, err = run_cli("compress", src, "-o", tmp_path / "streamed", "--ratio", RATIO, *FAST, *HEAL, "--streamed")
    assert code == 0, err[-3000:]
    assert _heapr(root / "healed")["expert_widths"] == _heapr(tmp_path / "streamed")["expert_widths"]
    from heapr_serve.eval.perplexity import eval_tokens, perplexity

    tokens, _ = eval_tokens(load_tokenizer(src), None)
    ppl = [perplexity(AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32), tokens, 32, 8, max_tokens=2048)
           for f in (root / "healed", tmp_path / "streamed")]
    assert abs(ppl[0] - ppl[1]) <= 1e-3 * ppl[0], ppl


def test_ratio_zero_heal_changes_nothing(tiny_models, tmp_path):
    src = tiny_models["mixtral"]
    for name, flags in {"plain": [], "healed": HEAL}.items():
        assert run_cli("compress", src, "-o", tmp_path / name, "--ratio", "0", *FAST, *flags)[0] == 0
    a, b = _tensors(tmp_path / "plain"), _tensors(tmp_path / "healed")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_interrupted_heal_resumes_with_the_same_result(healed, tmp_path, monkeypatch):
    src, root = healed
    from heapr_serve.prune import heal as heal_module

    real = heal_module.heal_layer
    seen = []

    def stop_at_second(*args, **kwargs):
        seen.append(args[-1])
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(heal_module, "heal_layer", stop_at_second)
    out = tmp_path / "resumed"
    code, _, _ = run_cli("compress", src, "-o", out, "--ratio", RATIO, *FAST, *HEAL)
    assert code == 130 and not out.exists()
    assert list(partial_folder(out).glob("heal-rank0-of-1/layer-*.safetensors"))  # the first healed layer was kept
    monkeypatch.setattr(heal_module, "heal_layer", real)
    code, _, err = run_cli("compress", src, "-o", out, "--ratio", RATIO, *FAST, *HEAL)
    assert code == 2 and "--resume" in err  # not silently started again
    code, _, err = run_cli("compress", src, "-o", out, "--ratio", RATIO, *FAST, *HEAL, "--resume")
    assert code == 0, err[-3000:]
    record = _heapr(out)["heal"]["layers"]
    assert record[str(seen[0])] == {"resumed": True}
    a, b = _tensors(root / "healed"), _tensors(out)
    assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7) for n in a)
    assert not partial_folder(out).exists()


def test_apply_heal_rereads_the_recorded_calibration(healed, tmp_path):
    src, root = healed
    code, _, err = run_cli("apply", root / "plain", "-o", tmp_path / "again", "--ratio", RATIO, *HEAL)
    assert code == 0, err[-3000:]
    a, b = _tensors(root / "healed"), _tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7) for n in a)


def test_two_gloo_ranks_heal_together(healed, tmp_path):
    src, root = healed
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "heapr_serve", "compress", str(src),
                           "-o", str(tmp_path / "two"), "--ratio", RATIO, *FAST, *HEAL],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks" in proc.stderr
    record = _heapr(tmp_path / "two")
    assert record["expert_widths"] == _heapr(root / "healed")["expert_widths"]
    assert all(r["held_out_after"] < r["held_out_before"] for r in record["heal"]["layers"].values())
    assert not partial_folder(tmp_path / "two").exists()


@pytest.mark.parametrize("flags,message", [
    (["--heal-steps", "0"], "--heal-steps"),
    (["--heal-epochs", "0"], "--heal-epochs"),
    (["--heal-epochs", "nan"], "--heal-epochs"),
    (["--heal-lr", "0"], "--heal-lr"),
    (["--heal-lr", "2"], "--heal-lr"),
    (["--heal-holdout", "1"], "--heal-holdout"),
    (["--heal-batch-tokens", "0"], "--heal-batch-tokens"),
    (["--heal-target", "logits"], "--heal-target"),
    (["--heal-e2e-lr", "0"], "--heal-e2e-lr"),
    (["--reconstruct", "--reconstruct-inputs", "dense"], "--reconstruct-inputs dense"),
])
def test_bad_heal_flags_are_refused_in_one_line(tiny_models, tmp_path, flags, message):
    code, _, err = run_cli("compress", tiny_models["qwen3_moe"], "-o", tmp_path / "x", "--heal", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_heal_refuses_gpt_oss_before_any_work(tiny_models, tmp_path):
    code, _, err = run_cli("compress", tiny_models["gpt_oss"], "-o", tmp_path / "x", "--heal")
    assert code == 2 and "--heal" in err and "gpt_oss" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_heal_e2e_lowers_the_held_out_kl_and_needs_the_model_in_memory(tmp_path):
    out = tmp_path / "e2e"
    code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", out, "--ratio", RATIO, *FAST, *HEAL, "--heal-e2e", "--heal-e2e-steps", "40", "--heal-e2e-lr", "0.01")
    assert code == 0, err[-3000:]
    e2e = _heapr(out)["heal"]["e2e"]
    assert e2e["held_out_kl_after"] < e2e["held_out_kl_before"] and 0 < e2e["steps"] <= 40
    code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", tmp_path / "x", *FAST, "--heal-e2e", "--streamed")
    assert code == 2 and "--heal-e2e" in err and "--streamed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_stream_target_equals_the_layer_target_until_the_models_drift_apart(healed, tmp_path):
    """Layer 0 sees the same inputs in both models, so its stream target is the dense layer's output;
    from layer 1 on the target also carries the drift between the dense and the pruned model."""
    src, root = healed
    out = tmp_path / "stream"
    code, _, err = run_cli("compress", src, "-o", out, "--ratio", RATIO, *FAST, *HEAL, "--heal-target", "stream")
    assert code == 0, err[-3000:]
    record = _heapr(out)["heal"]
    assert record["target"] == "stream" and all(r["held_out_after"] < r["held_out_before"] for r in record["layers"].values())
    a, b = _tensors(root / "healed"), _tensors(out)
    first = [n for n in a if ".layers.0.mlp." in n]
    later = [n for n in a if ".mlp.experts." in n and ".layers.0." not in n]
    assert first and all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7) for n in first)
    assert any(not torch.allclose(a[n], b[n], rtol=1e-3, atol=1e-5) for n in later)


def test_heal_e2e_refuses_a_model_that_does_not_fit_twice(tmp_path, monkeypatch):
    from heapr_serve.score import memory

    monkeypatch.setattr(memory, "host_available", lambda: 26 << 20)  # fits streamed, not twice in memory
    code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", tmp_path / "x", *FAST, "--heal-e2e")
    assert code == 2 and "--heal-e2e" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_relative_adam_steps_as_torch_adam_with_a_group_per_tensor():
    """The fused per-tensor optimiser is torch.optim.Adam with each tensor's lr = lr x its RMS,
    including a tensor whose first gradient comes late (it is skipped until then, as Adam skips it)."""
    import math

    from heapr_serve.prune.relative_adam import RelativeAdam

    torch.manual_seed(0)
    ours = [torch.randn(6, 5) * scale for scale in (1.0, 0.01, 3.0)]
    theirs, start = [t.clone() for t in ours], [t.clone() for t in ours]
    for t in ours + theirs:
        t.requires_grad_(True)
    reference = torch.optim.Adam([{"params": [t], "lr": 1e-2 * float(t.detach().pow(2).mean().sqrt())} for t in theirs])
    base = [g["lr"] for g in reference.param_groups]
    optimizer = RelativeAdam(ours, 1e-2)
    for step in range(40):
        factor = 0.5 * (1 + math.cos(math.pi * step / 40))
        for g, lr in zip(reference.param_groups, base):
            g["lr"] = lr * factor
        for tensors in (ours, theirs):
            loss = sum((t.pow(3) - t).sum() for t in (tensors if step >= 5 else tensors[:2]))
            loss.backward()
        optimizer.step(factor)
        reference.step()
        optimizer.zero_grad()
        reference.zero_grad(set_to_none=False)
    for a, b, s in zip(ours, theirs, start):
        assert (a - s).abs().max() > 1e-3  # it moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [int(s) for s in optimizer.steps] == [40, 40, 35]


def test_least_squares_start_is_fitted_on_the_training_sequences_alone():
    """With --reconstruct --heal, the held-out sequences must not enter the re-fit's Gram sums: a start
    fitted on them makes the held-out error in-sample, and no step on the training tokens then beats it."""
    from heapr_serve.prune.heal import _BlockRecorder
    from heapr_serve.score.moe_forward import use_sorted_forward

    model = AutoModelForCausalLM.from_pretrained(EXAMPLE_MODEL, dtype=torch.float32)
    use_sorted_forward(model)
    block = model.model.layers[0].mlp
    x = torch.randn(3, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 6:] = 0  # padding counts nowhere either

    def grams(rows: slice, held_from: int) -> tuple[torch.Tensor, _BlockRecorder]:
        recorder = _BlockRecorder(block, gram=True, held_from=held_from)
        recorder.attach({0: block})
        try:
            with torch.no_grad():
                recorder.begin_batch(mask[rows])
                block(x[rows])
        finally:
            recorder.detach()
        return recorder.gram[0], recorder

    with_held, recorder = grams(slice(0, 3), held_from=2)
    assert len(recorder.inputs) == 3  # every sequence is still recorded (the held-out ones evaluate)
    assert [len(t) for t in recorder.inputs] == [8, 6, 8]
    training_only, _ = grams(slice(0, 2), held_from=10)
    everything, _ = grams(slice(0, 3), held_from=10)
    scale = float(with_held.abs().max())  # float32 activations of other batch shapes: equal to rounding
    assert torch.allclose(with_held, training_only, rtol=0, atol=1e-5 * scale)
    assert not torch.allclose(with_held, everything, rtol=0, atol=1e-2 * scale)


def test_heal_steps_follow_the_calibration_size():
    """--heal-epochs passes over all ranks' training tokens, each rank a batch a step, up to --heal-steps."""
    from heapr_serve.prune.heal import HealOptions, planned_steps

    assert planned_steps(HealOptions(), 14_745, 1) == 58  # ceil(4 x 14,745 / 1024): the bundled model's default calibration
    assert planned_steps(HealOptions(), 14_745, 2) == 29  # two ranks, a batch each per step
    assert planned_steps(HealOptions(), 10**7, 1) == 400  # capped by --heal-steps
    assert planned_steps(HealOptions(epochs=1e-3), 100, 1) == 1
