"""What every heapr-serve routed-experts method shares: vLLM's questions answered alike, the one check
of `apply`, and the log line that says which kernel runs and why.

The unquantized methods (model_patches.vllm.ragged_method and its backends) and the quantized one
(model_patches.vllm.quantized) derive from `HeaprMoEMethodBase`; the layer (model_patches.vllm.layer)
imports them all and picks one, so nothing here imports back.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

from heapr_serve.errors import HeaprError


def say_backend(what: str, backend: str, why: str) -> None:
    """Once per layer type (vLLM's info_once keys on the message): which kernel runs, and why."""
    init_logger("vllm.heapr_serve").info_once("heapr-serve: %s: backend %s (%s)", what, backend, why)


class HeaprMoEMethodBase(FusedMoEMethodBase):
    """What every heapr-serve experts method answers vLLM alike: modular, no EPLB, and no quant
    config for vLLM's kernels (the method runs its own buckets). Each method's `forward` is the
    routed-expert output; `apply` checks the one thing none of them supports first."""

    @property
    def supports_eplb(self) -> bool:
        return False

    @property
    def is_monolithic(self) -> bool:
        return False

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig | None:
        return FusedMoEQuantConfig.make()

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        if layer.apply_router_weight_on_input:
            raise HeaprError("apply_router_weight_on_input is not supported by heapr-serve's ragged experts")
        return self.forward(layer, x, topk_weights, topk_ids)

    @abstractmethod
    def forward(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The routed experts' output [T, H] for these routed tokens."""
