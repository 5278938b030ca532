"""gpt-oss's routed experts: biases, a clamped SwiGLU, and gate/up interleaved in one stack.

transformers' `GptOssExperts` holds gate_up_proj [E, H, 2I] (gate at even columns, up at odd),
gate_up_proj_bias [E, 2I], down_proj [E, I, H] and down_proj_bias [E, H], and computes
a = (clamp(u, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = clamp(gate, max=limit). Atomic
expert j is gate column 2j and up column 2j+1 with their bias entries, and down row j; the down bias
belongs to no neuron and stays whole (a width-0 expert still adds it).
"""

from __future__ import annotations

import torch
from torch import nn


def is_gpt_oss_experts(experts: nn.Module) -> bool:
    return hasattr(experts, "gate_up_proj_bias") and hasattr(experts, "down_proj_bias")


def clamped_swiglu(alpha: float, limit: float):
    """gpt-oss's gated activation of the (biased) gate and up pre-activations."""

    def glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return glu


def expert_weights(experts: nn.Module):
    """Per expert, views in the standard orientation: gate [I, H], up [I, H], down [H, I] and the
    gate, up and down biases."""

    def weights(e: int):
        gate_up, bias = experts.gate_up_proj[e], experts.gate_up_proj_bias[e]
        return (gate_up[:, 0::2].t(), gate_up[:, 1::2].t(), experts.down_proj[e].t(),
                bias[0::2], bias[1::2], experts.down_proj_bias[e])

    return weights


def fused_slices(kind: str, tensor: torch.Tensor, expert: int, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pruned per-expert tensors (proj -> tensor, `gate_proj.weight` and so on) of one expert from
    one on-disk gpt-oss stack: gate_up_proj [E, H, 2I] -> gate/up [K, H]; gate_up_proj_bias [E, 2I] ->
    gate/up biases [K]; down_proj [E, I, H] -> [H, K]; down_proj_bias [E, H] -> [H], whole."""
    if kind == "gate_up_proj":
        t = tensor[expert]
        return {"gate_proj.weight": t[:, 0::2].t().index_select(0, kept), "up_proj.weight": t[:, 1::2].t().index_select(0, kept)}
    if kind == "gate_up_proj_bias":
        t = tensor[expert]
        return {"gate_proj.bias": t[0::2].index_select(0, kept), "up_proj.bias": t[1::2].index_select(0, kept)}
    if kind == "down_proj":
        return {"down_proj.weight": tensor[expert].index_select(0, kept).t()}
    return {"down_proj.bias": tensor[expert]}

