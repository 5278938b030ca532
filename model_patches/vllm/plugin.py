"""vLLM general plugin (entry point `vllm.general_plugins`): registers the heapr-serve architectures.

vLLM calls `register()` in every process it starts, before a model is resolved. There is one
architecture per family of the registry (heapr_serve.families), registered as a lazy "module:Class"
string, so importing this file costs nothing and loads no vLLM model code; stock architectures are
never touched, so stock models serve exactly as without the plugin.
"""

from __future__ import annotations

from heapr_serve.families import FAMILIES

ARCHITECTURES = {f.pruned_architecture: f"model_patches.vllm.models:{f.pruned_architecture}" for f in FAMILIES.values()}


def register() -> None:
    """Register each heapr-serve architecture once (idempotent: vLLM may call plugins repeatedly)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
