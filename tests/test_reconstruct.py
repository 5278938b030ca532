"""`--reconstruct`: the re-fit lowers every touched expert's calibration output error (measured here
from the dense model's own activations, not from the Gram matrices the re-fit used), ratio 0 leaves
the checkpoint bit-identical, the sequential mode fits on the pruned model's inputs, and `apply
--reconstruct` re-reads the recorded calibration set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from heapr_serve.calibrate.datasets import load_calibration
from heapr_serve.models import load_tokenizer
from heapr_serve.score.calibration_pass import InMemoryPass
from heapr_serve.score.observers import ExpertObserver

from conftest import run_cli

FAST = ["--nsamples", "8", "--seq-len", "32", "--batch-size", "2"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _downs(folder: Path) -> dict[tuple[int, int], torch.Tensor]:
    return {(int(n.split(".")[2]), int(n.split(".")[5])): t for n, t in _tensors(folder).items() if n.endswith("down_proj.weight") and ".experts." in n}


class _Activations(ExpertObserver):
    """Every real token's activation a [n, I] per (layer, expert), forward only."""

    def __init__(self):
        super().__init__()
        self.acts: dict[tuple[int, int], list[torch.Tensor]] = {}

    def allocate(self, layer, experts):
        pass

    def observe(self, layer, expert, tokens, activation, output, route_weights):
        a = activation.detach().double()
        if self.token_weight is not None:
            a = a[self.token_weight[tokens] > 0]
        self.acts.setdefault((layer, expert), []).append(a)


@pytest.fixture(scope="module")
def compressed(tiny_models, tmp_path_factory):
    src = tiny_models["qwen2_moe"]
    root = tmp_path_factory.mktemp("reconstruct")
    runs = {"plain": [], "dense": ["--reconstruct", "--reconstruct-inputs", "dense"], "pruned": ["--reconstruct"]}
    for name, flags in runs.items():
        code, _, err = run_cli("compress", src, "-o", root / name, "--ratio", "0.5", *FAST, *flags)
        assert code == 0, err[-3000:]
    return src, root


def test_refit_lowers_every_touched_experts_calibration_error(compressed):
    src, root = compressed
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = load_tokenizer(src)
    calibration = load_calibration(None, tokenizer, 8, 32, 0, model.config.vocab_size)
    observer = _Activations()
    InMemoryPass(model).run(list(calibration.batches(2, tokenizer.pad_token_id or 0)), observer, 1.0, backward=False)
    plain, refit = _downs(root / "plain"), _downs(root / "dense")
    assert set(plain) == set(refit)
    blocks = {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}
    dense = {(i, e): b.experts.down_proj[e].detach().double() for i, b in blocks.items() for e in range(b.experts.num_experts)}
    gate_up = {(i, e): b.experts.gate_up_proj[e].detach() for i, b in blocks.items() for e in range(b.experts.num_experts)}
    pruned_gates = {(int(n.split(".")[2]), int(n.split(".")[5])): t for n, t in _tensors(root / "plain").items()
                    if n.endswith("gate_proj.weight") and ".experts." in n}
    touched = 0
    for key, new in refit.items():
        width = dense[key].shape[1]
        # the kept neurons: rows of the dense gate that the pruned gate kept, in order
        kept = torch.tensor([int(torch.nonzero((gate_up[key][:width] == row).all(1))[0]) for row in pruned_gates[key]], dtype=torch.long)
        a = torch.cat(observer.acts[key])
        target = a @ dense[key].t()
        before = (target - a[:, kept] @ plain[key].double().t()).pow(2).sum()
        after = (target - a[:, kept] @ new.double().t()).pow(2).sum()
        assert torch.equal(plain[key], dense[key][:, kept].float())  # the plain checkpoint holds the dense columns
        if not torch.equal(new, plain[key]):
            touched += 1
            assert after < before, (key, float(before), float(after))
    assert touched >= len(refit) // 2
    card = (root / "dense" / "README.md").read_text()
    assert "re-fitted" in card and "re-fitted" not in (root / "plain" / "README.md").read_text()


def test_sequential_refit_sees_the_pruned_models_inputs(compressed):
    _, root = compressed
    dense, pruned = _downs(root / "dense"), _downs(root / "pruned")
    first = min(layer for layer, _ in dense)
    # layer 0's inputs are the embeddings either way; later layers see what the re-fitted layers below produce
    assert all(torch.allclose(dense[k], pruned[k], atol=1e-6) for k in dense if k[0] == first)
    assert any(not torch.allclose(dense[k], pruned[k], atol=1e-4) for k in dense if k[0] > first)
    record = json.loads((root / "pruned" / "config.json").read_text())["heapr"]["reconstruct"]
    assert record["inputs"] == "pruned" and record["experts_refit"] > 0 and record["error_after"] < record["error_before"]


def test_ratio_zero_is_bit_identical(tiny_models, tmp_path):
    src = tiny_models["mixtral"]
    for name, flags in {"plain": [], "refit": ["--reconstruct"]}.items():
        assert run_cli("compress", src, "-o", tmp_path / name, "--ratio", "0", *FAST, *flags)[0] == 0
    a, b = _tensors(tmp_path / "plain"), _tensors(tmp_path / "refit")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_apply_reconstruct_rereads_the_recorded_calibration(compressed, tmp_path):
    src, root = compressed
    code, _, err = run_cli("apply", root / "plain", "-o", tmp_path / "again", "--ratio", "0.5", "--reconstruct")
    assert code == 0, err[-3000:]
    a, b = _downs(root / "pruned"), _downs(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # a scores file whose calibration cannot be re-read is refused in one line
    bad = tmp_path / "bad"
    bad.mkdir()
    from heapr_serve.score.stats import ExpertStats

    stats = ExpertStats.load(root / "plain")
    stats.metadata["calibration"]["sha256"] = "0" * 64
    stats.save(bad / "heapr_scores.safetensors")
    code, _, err = run_cli("apply", bad, "-o", tmp_path / "x", "--ratio", "0.5", "--reconstruct", "--model", src)
    assert code == 2 and "compress --reconstruct" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags,message", [(["--reconstruct-inputs", "both"], "--reconstruct-inputs"),
                                           (["--reconstruct-damp", "0"], "--reconstruct-damp")])
def test_bad_reconstruct_flags(tiny_models, tmp_path, flags, message):
    code, _, err = run_cli("compress", tiny_models["qwen3_moe"], "-o", tmp_path / "x", "--reconstruct", *flags)
    assert code == 2 and message in err
    assert not (tmp_path / "x").exists()


def test_error_from_the_observed_energy_equals_the_trace_form():
    """refit_down's error with the dense energy the observer summed equals the tr(D C D^T) form."""
    from heapr_serve.prune.reconstruct import refit_down

    g = torch.Generator().manual_seed(0)
    a, down = torch.randn(300, 24, generator=g, dtype=torch.float64), torch.randn(16, 24, generator=g)
    kept = torch.tensor([0, 3, 5, 9, 10, 17, 20])
    gram, energy = a.t() @ a, float((a @ down.double().t()).pow(2).sum())
    new, before, after = refit_down(down, gram, kept, 1e-3, energy)
    new2, before2, after2 = refit_down(down, gram, kept, 1e-3)
    assert torch.equal(new, new2) and abs(before - before2) < 1e-9 * before and abs(after - after2) < 1e-9 * before
    plain = (a @ down.double().t() - a[:, kept] @ down[:, kept].double().t()).pow(2).sum()
    refit = (a @ down.double().t() - a[:, kept] @ new.double().t()).pow(2).sum()
    assert abs(before - float(plain)) < 1e-9 * float(plain) and abs(after - float(refit)) < 1e-5 * float(plain) and refit < plain


def test_output_correction_equals_running_the_layer_again(tiny_models, tmp_path, monkeypatch):
    """The sequential re-fit corrects a layer's stored outputs by its routed experts' change instead
    of running it again; with no room to keep the activations it runs the layer again: same result."""
    from heapr_serve.prune import reconstruct

    src = tiny_models["deepseek_v3"]  # shared experts, dense first layer, scaled routing weights
    assert run_cli("compress", src, "-o", tmp_path / "corrected", "--ratio", "0.5", *FAST, "--reconstruct")[0] == 0
    monkeypatch.setattr(reconstruct, "ACTIVATION_BUDGET", 0)
    assert run_cli("compress", src, "-o", tmp_path / "rerun", "--ratio", "0.5", *FAST, "--reconstruct")[0] == 0
    records = [json.loads((tmp_path / r / "config.json").read_text())["heapr"]["reconstruct"] for r in ("corrected", "rerun")]
    moe_layers = len(json.loads((tmp_path / "rerun" / "config.json").read_text())["heapr"]["expert_widths"])
    assert records[0]["layers_recomputed"] == 0 and records[1]["layers_recomputed"] == moe_layers
    a, b = _downs(tmp_path / "corrected"), _downs(tmp_path / "rerun")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_streamed_calibration_with_reconstruct_equals_in_memory(compressed, tmp_path):
    """The re-fit is the same whether the statistics came from the streamed or the in-memory pass."""
    src, root = compressed
    code, _, err = run_cli("compress", src, "-o", tmp_path / "streamed", "--ratio", "0.5", *FAST, "--reconstruct", "--streamed",
                           "--activations-dir", tmp_path / "acts")
    assert code == 0, err[-3000:]
    a, b = _downs(root / "pruned"), _downs(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert not (tmp_path / "acts").exists() or not list((tmp_path / "acts").iterdir())  # nothing left behind
