"""The one-pass HEAPr statistics equal the paper's two-stage explicit-covariance definition."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from heapr_serve.calibrate.datasets import CalibrationSet
from heapr_serve.score.calibration_pass import collect_statistics
from heapr_serve.score.observers import HeaprObserver
from tools.two_stage_reference import two_stage_scores

from conftest import FAMILIES


def _calibration(vocab: int) -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, vocab, (n,), generator=g) for n in (48, 48, 30, 41, 48)]  # ragged: padding is exercised
    return CalibrationSet(samples, "random", 48)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_matches_two_stage(tiny_models, family):
    calib = _calibration(4096)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32)
    reference = two_stage_scores(model, calib.batches(2, pad_id=0), loss_scale=96.0)
    stats = collect_statistics(model, calib.batches(2, pad_id=0), loss_scale=96.0, observer=HeaprObserver())
    scores = stats.scores()
    assert set(scores) == set(reference) and scores
    real_tokens = sum(len(s) for s in calib.samples)
    for layer, ref in reference.items():
        got = scores[layer]
        assert int(stats.tokens[layer].sum()) == real_tokens * model.config.num_experts_per_tok  # padding excluded
        routed = ~torch.isnan(ref)
        assert torch.equal(routed, ~torch.isnan(got))
        assert routed.any() and (ref[routed] > 0).all()
        rel = ((got - ref).abs() / ref.abs())[routed].max().item()
        assert rel < 1e-5, f"layer {layer}: relative difference {rel:.2e}"


def test_statistics_memory_is_two_floats_per_atomic_expert(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3_moe"], dtype=torch.float32)
    stats = collect_statistics(model, _calibration(4096).batches(5, pad_id=0), loss_scale=240.0, observer=HeaprObserver())
    atomic = sum(t.numel() for t in stats.act_sq.values())
    assert stats.nbytes() <= 1.1 * 8 * atomic
    assert not any(p.grad is not None for p in model.parameters())  # no weight gradients were formed


def test_scores_survive_save_and_load(tmp_path, tiny_models):
    from heapr_serve.score.stats import ExpertStats

    model = AutoModelForCausalLM.from_pretrained(tiny_models["mixtral"], dtype=torch.float32)
    stats = collect_statistics(model, _calibration(4096).batches(5, pad_id=0), loss_scale=240.0, observer=HeaprObserver())
    stats.metadata = {"source_model": "x", "model_type": "mixtral"}
    stats.save(tmp_path / "s.safetensors")
    back = ExpertStats.load(tmp_path / "s.safetensors")
    assert back.metadata == stats.metadata
    for layer in stats.act_sq:
        assert torch.equal(back.act_sq[layer], stats.act_sq[layer])
        assert torch.equal(back.grad_sq[layer], stats.grad_sq[layer])
        assert torch.equal(back.tokens[layer], stats.tokens[layer])


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_fisher_matches_per_token_brute_force(tiny_models, family):
    """`--method fisher`'s one-pass sum (a * dL/da)^2 equals the per-token definition through the
    gradient at each expert's output (float64, token by token), padding excluded."""
    from heapr_serve.prune.methods import ScoreInputs, fisher_score
    from heapr_serve.score.observers import MethodStatsObserver
    from tools.two_stage_reference import fisher_reference

    calib = _calibration(4096)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32)
    reference = fisher_reference(model, calib.batches(2, pad_id=0), loss_scale=96.0)
    stats = collect_statistics(model, calib.batches(2, pad_id=0), loss_scale=96.0, observer=MethodStatsObserver())
    scores = fisher_score(ScoreInputs(stats, tiny_models[family]))
    assert set(scores) == set(reference) and scores
    for layer, ref in reference.items():
        got = scores[layer]
        routed = ~torch.isnan(ref)
        assert torch.equal(routed, ~torch.isnan(got)) and routed.any() and (ref[routed] > 0).all()
        rel = ((got - ref).abs() / ref.abs())[routed].max().item()
        assert rel < 1e-5, f"layer {layer}: relative difference {rel:.2e}"
        # not HEAPr's product of means: the rankings differ somewhere
        assert not torch.equal(torch.argsort(got[routed]), torch.argsort(stats.scores()[layer][routed]))
