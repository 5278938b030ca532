"""`AutoModelForCausalLM.from_pretrained(folder)` for pruned folders (heapr_serve installs this lazily).

A folder whose config.json has a `heapr` section goes to `loader.load_pruned`; dense folders go to the
stock loader untouched. Installed when transformers' auto-model module is first imported, so that
`import heapr_serve` stays cheap (that module alone takes seconds to import).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

import torch

_installed = False


def install() -> None:
    """Route `AutoModelForCausalLM.from_pretrained` of pruned folders to `load_pruned` (idempotent)."""
    global _installed
    if _installed:
        return
    from transformers import AutoModelForCausalLM

    from heapr_serve.checkpoint.format import is_pruned
    from model_patches.transformers.loader import load_pruned

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
