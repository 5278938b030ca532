"""The Python custom ops through which a pruned layer's CPU dispatch runs where no native op does.

vLLM compiles the CPU model with fullgraph=True and calls the MoE forward inline, so a dispatch whose
shapes depend on the routing (sort, bincount, one kernel call per bucket) must run inside an opaque
op. The native ops (model_patches.vllm.cpu_ext) are that op where they built; otherwise these are:
`torch.ops.heapr_serve.cpu_bucketed_moe` (unquantized buckets) and `cpu_quantized_moe` (quantized
buckets). An op cannot take a module, so each finds its layer by a per-instance key (`register`) and
runs the layer's method's Python dispatch, `run(layer, x, topk_weights, topk_ids)`.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

_LAYER_IDS = itertools.count()
_LAYERS: weakref.WeakValueDictionary[str, torch.nn.Module] = weakref.WeakValueDictionary()


def register(layer: torch.nn.Module, name: str) -> str:
    """The key under which the ops find `layer`: unique per instance, since layer names repeat across
    models in one process."""
    key = f"{name}#{next(_LAYER_IDS)}"
    _LAYERS[key] = layer
    return key


def _run_layer(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    """Routed-expert output of the layer registered as `layer_name`, by its method's Python dispatch."""
    layer = _LAYERS[layer_name]
    return layer.quant_method.run(layer, x, topk_weights, topk_ids)


def _run_layer_fake(x, topk_weights, topk_ids, layer_name):
    return torch.empty_like(x)


# registered the way vLLM registers its own ops: torch.library.custom_op's Python dispatch costs
# ~0.1 ms a call, a few percent of a decode-sized MoE layer
_LIB = torch.library.Library("heapr_serve", "FRAGMENT")
if current_platform.is_cpu():
    for _name in ("cpu_bucketed_moe", "cpu_quantized_moe"):
        direct_register_custom_op(_name, _run_layer, mutates_args=[], fake_impl=_run_layer_fake, target_lib=_LIB)
