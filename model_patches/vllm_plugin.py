"""vLLM general plugin (entry point `vllm.general_plugins`): registers the heapr-serve architectures.

vLLM calls `register()` in every process it starts, before a model is resolved. Registration uses lazy
"module:Class" strings, so importing this file costs nothing and loads no vLLM model code; stock
architectures are never touched, so stock models serve exactly as without the plugin.
"""

from __future__ import annotations

ARCHITECTURES = {
    "HeaprQwen3MoeForCausalLM": "model_patches.vllm_qwen3_moe:HeaprQwen3MoeForCausalLM",
    "HeaprQwen2MoeForCausalLM": "model_patches.vllm_qwen2_moe:HeaprQwen2MoeForCausalLM",
    "HeaprMixtralForCausalLM": "model_patches.vllm_mixtral:HeaprMixtralForCausalLM",
    "HeaprOlmoeForCausalLM": "model_patches.vllm_olmoe:HeaprOlmoeForCausalLM",
    "HeaprDeepseekV3ForCausalLM": "model_patches.vllm_deepseek_v3:HeaprDeepseekV3ForCausalLM",
}


def register() -> None:
    """Register each heapr-serve architecture once (idempotent: vLLM may call plugins repeatedly)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
