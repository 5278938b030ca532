"""The pruning-method registry: each score is what docs/quality.md says it is (checked against an
independent computation on the dense model), each allocation keeps what it promises, and every method
goes through the same checkpoint path (the pruned folder computes exactly the masked dense model)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from heapr_serve.calibrate.datasets import CalibrationSet
from heapr_serve.families import moe_blocks
from heapr_serve.prune.methods import METHODS, ScoreInputs, activation_score, magnitude_score, plan_for_method, random_score
from heapr_serve.prune.options import PruneOptions
from heapr_serve.models import load_model
from heapr_serve.score.calibration_pass import collect_statistics
from heapr_serve.score.observers import HeaprObserver
from heapr_serve.score.stats import REAP_KEY, ExpertStats

from conftest import run_cli

FAST = ["--nsamples", "4", "--seq-len", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def calibrated(tiny_models):
    """(source folder, dense model, stats) for the tiny Qwen3-MoE, with ragged (padded) batches."""
    src = tiny_models["qwen3_moe"]
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(1, 4096, (n,), generator=g) for n in (40, 40, 27, 33)]
    calib = CalibrationSet(samples, "random", 40)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    stats = collect_statistics(model, calib.batches(2, pad_id=0), loss_scale=80.0)
    return src, model, stats, calib


def test_one_pass_keeps_heapr_statistics_exact(calibrated):
    src, _, stats, calib = calibrated
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    plain = collect_statistics(model, calib.batches(2, pad_id=0), loss_scale=80.0, observer=HeaprObserver())
    for layer in plain.act_sq:
        assert torch.equal(plain.act_sq[layer], stats.act_sq[layer])
        assert torch.equal(plain.grad_sq[layer], stats.grad_sq[layer])
        assert torch.equal(plain.tokens[layer], stats.tokens[layer])


def test_reap_statistic_matches_a_direct_computation(calibrated):
    """sum over real tokens of router weight * ||expert output||, recomputed from the dense weights."""
    src, _, stats, calib = calibrated
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    blocks = moe_blocks(model)
    captured = {}
    hooks = [b.register_forward_hook(lambda mod, inp, out, layer=layer: captured.setdefault(layer, []).append(inp[0].detach()))
             for layer, b in blocks.items()]
    masks = []
    with torch.no_grad():
        for ids, mask, _ in calib.batches(2, pad_id=0):
            model(input_ids=ids, attention_mask=mask)
            masks.append(mask.reshape(-1).bool())
    for h in hooks:
        h.remove()
    for layer, block in blocks.items():
        experts = block.experts
        width = experts.down_proj.shape[-1]
        expected = torch.zeros(experts.num_experts, dtype=torch.float64)
        for hidden, real in zip(captured[layer], masks):
            x = hidden.reshape(-1, hidden.shape[-1])[real]
            _, weights, index = block.gate(x)
            for e in range(experts.num_experts):
                rows, slot = torch.nonzero(index == e, as_tuple=True)
                gate_up = experts.gate_up_proj[e]
                a = experts.act_fn(x[rows] @ gate_up[:width].t()) * (x[rows] @ gate_up[width:].t())
                y = a @ experts.down_proj[e].t()
                expected[e] += float((weights[rows, slot] * y.norm(dim=-1)).detach().double().sum())
        got = torch.tensor(stats.metadata[REAP_KEY][str(layer)], dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=1e-4), layer


def test_neuron_scores_match_their_definitions(calibrated):
    src, model, stats, _ = calibrated
    blocks = moe_blocks(model)
    inputs = ScoreInputs(stats, src, seed=3)
    activation, magnitude = activation_score(inputs), magnitude_score(inputs)
    for layer, block in blocks.items():
        width = block.experts.down_proj.shape[-1]
        gate, up = block.experts.gate_up_proj[:, :width], block.experts.gate_up_proj[:, width:]
        down = block.experts.down_proj  # [E, H, I]
        mean_a2 = stats.act_sq[layer].double() / stats.tokens[layer].double().unsqueeze(-1)
        routed = stats.tokens[layer] > 0
        assert torch.allclose(activation[layer][routed], (mean_a2 * down.norm(dim=1).double() ** 2)[routed], rtol=1e-5)
        assert torch.isnan(activation[layer][~routed]).all()
        expected = (gate.norm(dim=2) * up.norm(dim=2) * down.norm(dim=1)).double()
        assert torch.allclose(magnitude[layer], expected, rtol=1e-5)
    again, other = random_score(ScoreInputs(stats, src, seed=3)), random_score(ScoreInputs(stats, src, seed=4))
    assert all(torch.equal(random_score(inputs)[layer], again[layer]) for layer in again)
    assert not all(torch.equal(other[layer], again[layer]) for layer in again)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_allocations(calibrated, ratio):
    src, _, stats, _ = calibrated
    experts, dense = next(iter(stats.act_sq.values())).shape
    heapr_scores = stats.scores()
    for name in METHODS:
        plan = plan_for_method(stats, src, PruneOptions(ratio, name, align=8, seed=1))
        assert set(plan.keep) == set(stats.act_sq), name
        if name in ("reap", "frequency"):
            drop = round(ratio * experts)
            for layer, widths in plan.widths.items():
                assert sorted(widths) == [0] * drop + [dense] * (experts - drop), (name, layer)
                score = (torch.tensor(stats.metadata[REAP_KEY][str(layer)]) / stats.tokens[layer].clamp(min=1)
                         if name == "reap" else stats.tokens[layer].double())
                removed = [e for e, w in enumerate(widths) if w == 0]
                kept = [e for e, w in enumerate(widths) if w > 0]
                assert score[removed].max() <= score[kept].min(), (name, layer)  # the lowest experts go
            assert plan.effective_ratio == pytest.approx(drop / experts)
        elif name == "uniform":
            width = round((1 - ratio) * dense / 8) * 8
            for layer, keep in plan.keep.items():
                for e, kept in enumerate(keep):
                    assert len(kept) == width
                    top = torch.argsort(heapr_scores[layer][e], descending=True, stable=True)[:width]
                    if stats.tokens[layer][e] > 0:
                        assert torch.equal(kept, torch.sort(top).values)
        else:
            assert abs(plan.effective_ratio - ratio) <= 8 / (len(plan.keep) * experts * dense) + 1e-9, name
            assert all(w % 8 == 0 for ws in plan.widths.values() for w in ws), name
    # the global HEAPr allocation gives experts different widths; uniform does not
    assert len({w for ws in plan_for_method(stats, src, PruneOptions(ratio, "heapr", align=8)).widths.values() for w in ws}) > 1


def _masked_dense_logits(src, keep, ids):
    """The dense model with every removed neuron's down-projection column zeroed: what pruning promises."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer, block in moe_blocks(model).items():
            down = block.experts.down_proj  # [E, H, I]
            for e, kept in enumerate(keep[layer]):
                mask = torch.zeros(down.shape[-1], dtype=torch.bool)
                mask[kept] = True
                down[e][:, ~mask] = 0
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["reap", "uniform", "activation"])
def test_every_method_writes_the_same_format_and_computes_the_masked_model(tmp_path, tiny_models, capsys, method):
    src = tiny_models["qwen3_moe"]
    base = tmp_path / "heapr"
    code, _, err = run_cli("compress", src, "-o", base, "--ratio", "0.25", *FAST, capsys=capsys)
    assert code == 0, err
    out = tmp_path / method
    code, stdout, err = run_cli("apply", base, "-o", out, "--ratio", "0.5", "--method", method, capsys=capsys)
    assert code == 0, err
    assert method in json.loads((out / "config.json").read_text())["heapr"]["method"]
    heapr = json.loads((out / "config.json").read_text())["heapr"]
    assert heapr["effective_ratio"] == pytest.approx(0.5, abs=1 / 64)
    stats = ExpertStats.load(out)  # the statistics travel along, readable by every loader
    plan = plan_for_method(stats, src, PruneOptions(0.5, method))
    assert {str(k): v for k, v in plan.widths.items()} == heapr["expert_widths"]
    ids = torch.randint(1, 4096, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        pruned = load_model(out, torch.float32, torch.device("cpu"))(input_ids=ids).logits
    assert torch.allclose(pruned, _masked_dense_logits(src, plan.keep, ids), atol=1e-5)


def test_bad_method_is_one_line_and_old_scores_refuse_reap(tmp_path, tiny_models, capsys):
    src = tiny_models["qwen3_moe"]
    code, _, err = run_cli("compress", src, "-o", tmp_path / "x", "--method", "prune-everything", *FAST, capsys=capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "--method" in err and "heapr" in err
    assert not (tmp_path / "x").exists()
    base = tmp_path / "base"
    assert run_cli("compress", src, "-o", base, *FAST, capsys=capsys)[0] == 0
    old = ExpertStats.load(base)
    old.metadata.pop(REAP_KEY)
    old.save(tmp_path / "old_scores.safetensors")
    code, _, err = run_cli("apply", tmp_path / "old_scores.safetensors", "-o", tmp_path / "y", "--ratio", "0.25",
                           "--method", "reap", "--model", src, capsys=capsys)
    assert code == 2 and "--method reap" in err and "re-run" in err and not (tmp_path / "y").exists()


def test_keep_unrouted_keeps_never_routed_experts_whole_in_every_method(tiny_models):
    """An expert the calibration never reached is kept at full width with --keep-unrouted, whether the
    method's score comes from calibration (NaN there) or from weights alone (magnitude, random)."""
    stats = ExpertStats.zeros({0: (8, 64), 1: (8, 64)})
    g = torch.Generator().manual_seed(0)
    for layer in (0, 1):
        stats.act_sq[layer].copy_(torch.rand(8, 64, generator=g))
        stats.grad_sq[layer].copy_(torch.rand(8, 64, generator=g))
        stats.tokens[layer].copy_(torch.tensor([5, 0, 3, 2, 4, 4, 4, 4]))
    stats.metadata[REAP_KEY] = {"0": [1.0] * 8, "1": [1.0] * 8}
    for name in METHODS:
        kept = plan_for_method(stats, tiny_models["qwen3_moe"], PruneOptions(0.5, name, keep_unrouted=True))
        assert all(widths[1] == 64 for widths in kept.widths.values()), name
        assert kept.unrouted == {0: [1], 1: [1]}, name
