"""One small adapter per supported MoE family: where the MoE blocks, router, experts and shared
experts live, and how routed experts are named on disk.

transformers 5 gives every supported family the same fused experts module
(`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`), so an adapter is mostly
names. Anything not listed here is refused with the list of what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from heapr_serve.errors import HeaprError


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class of the dense model
    disk_block: str  # the module name of the MoE block in checkpoint tensor names
    disk_projs: tuple[str, str, str]  # on-disk names of (gate, up, down) per expert
    shared_experts: str | None  # attribute of the MoE block holding shared experts (kept whole)
    router: str = "gate"  # attribute of the MoE block holding the router (kept whole)

    @property
    def pruned_architecture(self) -> str:
        return "Heapr" + self.architecture

    def expert_tensor_name(self, layer_prefix: str, layer: int, expert: int, proj: int) -> str:
        """On-disk name of one routed expert's 2-D tensor; proj 0 = gate, 1 = up, 2 = down."""
        return f"{layer_prefix}{layer}.{self.disk_block}.experts.{expert}.{self.disk_projs[proj]}.weight"


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), None),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
        Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), None),
        Family("olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), None),
        Family("deepseek_v3", "DeepseekV3ForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    ]
}


def family_for(config) -> Family:
    """The adapter for a transformers config (or a plain config dict), or a clear refusal."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise HeaprError(f"model_type {model_type!r} is not supported; supported MoE families: {supported}")
    return FAMILIES[model_type]


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder-layer index -> MoE block (the module holding `.experts` with fused weights).

    Dense MLP layers (DeepSeek's first layers, Qwen2-MoE's `mlp_only_layers`) are skipped.
    """
    layers = model.model.layers
    blocks = {}
    for i, layer in enumerate(layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            blocks[i] = layer.mlp
    if not blocks:
        raise HeaprError(f"{type(model).__name__} has no routed-expert (MoE) layers to prune")
    return blocks
