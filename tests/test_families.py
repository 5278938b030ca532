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


@pytest.mark.skipif(find_spec("vllm") is None, reason="needs vllm")
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_vllm_classes_are_derived_from_the_stock_models(model_type):
    import importlib

    from model_patches.vllm import models
    from model_patches.vllm.models import HeaprModelMixin

    family = FAMILIES[model_type]
    cls = getattr(models, family.pruned_architecture)
    stock = getattr(importlib.import_module(f"vllm.model_executor.models.{family.vllm_module}"), family.stock_vllm_class)
    assert issubclass(cls, HeaprModelMixin) and issubclass(cls, stock) and cls.heapr_family is family
    assert getattr(models, family.pruned_architecture) is cls  # built once
    with pytest.raises(AttributeError):
        getattr(models, "HeaprLlamaForCausalLM")


@pytest.mark.skipif(find_spec("vllm") is None, reason="needs vllm")
def test_cpu_router_limits_are_refused_with_the_reason():
    """vLLM-CPU's stock router (the real `CPURouter`, as MiniMax-M2's and ERNIE's MoE blocks build it)
    cannot route sigmoid scores without groups and drops a nonzero softmax score-correction bias: the
    pruned model is refused at load with the reason; a zero bias and grouped routing pass."""
    import torch
    from torch import nn
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    from model_patches.vllm.cpu_routing import check_cpu_routing

    def model(**router):
        holder = nn.Module()
        holder.experts = nn.Module()
        holder.experts.router = CPURouter(top_k=2, global_num_experts=8, renormalize=True, **router)
        return holder

    with pytest.raises(HeaprError, match="cannot route sigmoid scores.*serve it on CUDA"):
        check_cpu_routing(model(scoring_func="sigmoid", e_score_correction_bias=torch.zeros(8)), "HeaprMiniMaxM2ForCausalLM")
    with pytest.raises(HeaprError, match=r"^experts: vLLM's CPU router ignores this model's score-correction bias"):
        check_cpu_routing(model(e_score_correction_bias=torch.full((8,), 0.01)), "HeaprErnie4_5_MoeForCausalLM")
    check_cpu_routing(model(e_score_correction_bias=torch.zeros(8)), "HeaprErnie4_5_MoeForCausalLM")
    check_cpu_routing(model(use_grouped_topk=True, num_expert_group=2, topk_group=1, scoring_func="sigmoid",
                            e_score_correction_bias=torch.ones(8)), "HeaprGlm4MoeForCausalLM")
