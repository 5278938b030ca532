"""Loading pruned (ragged-width) checkpoints with `AutoModelForCausalLM.from_pretrained`.

transformers merges per-expert tensors into one `[E, 2I, H]` stack on load, which cannot hold experts
of different widths. For a folder whose config.json has a `heapr` section we build the stock model on
the meta device, swap each routed-experts module for `RaggedExperts` at the declared widths, and load
the tensors ourselves after `validate_checkpoint` has matched every shape against those widths.
Dense folders go to the stock loader untouched.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sys
from pathlib import Path

import torch

_installed = False


def _disk_to_module_name(name: str, family) -> str:
    """Map an on-disk tensor name to the module path of the stock model (Mixtral renames)."""
    if family.disk_block != "mlp":
        name = name.replace(f".{family.disk_block}.", ".mlp.")
        gate, up, down = family.disk_projs
        name = re.sub(
            rf"\.experts\.(\d+)\.({gate}|{up}|{down})\.weight$",
            lambda m: f".experts.{m[1]}.{ {gate: 'gate_proj', up: 'up_proj', down: 'down_proj'}[m[2]] }.weight",
            name,
        )
    return name


def _rebuild_non_persistent_buffers(model: torch.nn.Module, device) -> None:
    """Buffers not stored in checkpoints (rotary inverse frequencies) are recomputed on `device`."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config=child.config).to(device))


def load_pruned(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"):
    """Load a pruned folder as a transformers model with `RaggedExperts` in its MoE layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from heapr_serve.errors import HeaprError
    from heapr_serve.families import moe_blocks
    from heapr_serve.moe_forward import RaggedExperts
    from heapr_serve.pruned_format import open_safetensors, validate_checkpoint

    ckpt = validate_checkpoint(path)
    config = AutoConfig.from_pretrained(path)
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks = moe_blocks(model)
    if sorted(blocks) != sorted(ckpt.widths):
        raise HeaprError(
            f"{path}/config.json: heapr.expert_widths lists layers {sorted(ckpt.widths)} but the model's MoE layers are {sorted(blocks)}"
        )
    for layer, block in blocks.items():
        with torch.device("meta"):
            block.experts = RaggedExperts(ckpt.hidden_size, ckpt.widths[layer], block.experts.act_fn, dtype)

    state = {}
    for file in sorted(set(ckpt.tensor_files.values())):
        with open_safetensors(Path(path) / file, device=str(device)) as f:
            for name in f.keys():
                state[_disk_to_module_name(name, ckpt.family)] = f.get_tensor(name).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise HeaprError(f"{path}: tensors do not match the {ckpt.family.architecture} layout ({what})")
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    _rebuild_non_persistent_buffers(model, device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise HeaprError(f"{path}: could not materialise {leftover[:3]}; this transformers version is not supported")
    return model.to(device).eval()


def install() -> None:
    """Route `AutoModelForCausalLM.from_pretrained` of pruned folders to `load_pruned` (idempotent)."""
    global _installed
    if _installed:
        return
    from transformers import AutoModelForCausalLM

    from heapr_serve.pruned_format import is_pruned

    stock = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if is_pruned(Path(str(pretrained_model_name_or_path))):
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            device = kwargs.get("device_map") or "cpu"
            if not isinstance(device, (str, torch.device)):
                device = "cpu"
            return load_pruned(pretrained_model_name_or_path, dtype=dtype, device="cpu" if device == "auto" else device)
        return stock(cls, pretrained_model_name_or_path, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)
    _installed = True


_AUTO_MODULE = "transformers.models.auto.modeling_auto"


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Installs the patch right after transformers' auto-model module is first imported, so that
    `import heapr_serve` stays cheap (that module alone takes seconds to import)."""

    def find_spec(self, name, path, target=None):
        if name != _AUTO_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            install()

        spec.loader.exec_module = exec_then_install
        return spec


def install_lazily() -> None:
    """Install now if transformers' auto models are loaded, else as soon as they are."""
    if _AUTO_MODULE in sys.modules:
        install()
    elif not any(isinstance(f, _InstallAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterImport())
