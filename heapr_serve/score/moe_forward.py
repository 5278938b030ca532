"""A fast, instrumentable forward for routed experts, and the ragged-width experts module.

transformers' eager experts loop does one `index_add_` per expert and is slow to train and calibrate
on CPU. Here tokens are sorted by expert once, gathered once, each expert runs on a contiguous slice,
and the results are scattered back with one `index_add_` per layer (about ten times faster on CPU).

The same function serves four callers: the dense model during calibration (with an observer that
collects HEAPr statistics, heapr_serve.score.observers), training of the example model, the
transformers loader of pruned checkpoints (model_patches.transformers), whose experts have different
widths, and llm-compressor's linearised experts (one module of Linear layers per expert) that
`HEAPrPruningModifier` scores. Experts given as Linear modules are called as modules, so hooks on
them (llm-compressor's GPTQ) see each expert's routed tokens.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn

# e -> (gate [I, H], up [I, H], down [H, I]) or, with biases (gpt-oss), (gate, up, down, gate_bias [I],
# up_bias [I], down_bias [H]); None for a width-0 expert without biases. gate/up/down may instead be
# the expert's nn.Linear modules (then called, biases included).
ExpertWeights = Callable[[int], "tuple[torch.Tensor, ...] | None"]


# Sees, per expert, which tokens were routed to it (indices into the flattened batch), their
# intermediate activation `a = act(G x) * (U x)`, the expert output `y = D a` (before the router weight
# multiplies it) and those router weights: observe(expert, tokens, activation, output, route_weights).
Observe = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def sorted_moe_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert_weights: ExpertWeights,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    num_experts: int,
    observe: Observe | None = None,
    glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * D_e (act(G_e x_t) * U_e x_t) over the experts e = top_k_index[t, j].

    `expert_weights(e)` returns (gate [I_e, H], up [I_e, H], down [H, I_e]) or None for a width-0
    expert, which contributes exactly zero. The router weight multiplies the expert's output, so the
    gradient reaching the activation already carries it (as HEAPr's score requires). With biases
    (gpt-oss: six tensors) the gate/up pre-activations and the output get theirs, and `glu(gate, up)`
    replaces act(gate) * up; a width-0 expert then still adds its down bias.
    """
    num_tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token_of = order // top_k
    route_weights = top_k_weights.reshape(-1)[order]
    x = hidden[token_of]
    outputs = []
    start = 0
    for expert, count in enumerate(counts[:num_experts]):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        weights = expert_weights(expert)
        if weights is None:
            outputs.append(x.new_zeros(count, hidden.shape[-1]))
            continue
        gate, up, down, *bias = weights
        xs = x[rows]
        g, u = _project(xs, gate), _project(xs, up)
        if bias:
            g, u = g + bias[0], u + bias[1]
        activation = glu(g, u) if glu is not None else act_fn(g) * u
        expert_out = _project(activation, down)
        if bias:
            expert_out = expert_out + bias[2]
        if observe is not None:
            observe(expert, token_of[rows], activation, expert_out, route_weights[rows])
        outputs.append(expert_out)
    out = hidden.new_zeros(hidden.shape)
    if not outputs:
        return out
    y = torch.cat(outputs) * route_weights[:start].unsqueeze(-1).to(hidden.dtype)
    return out.index_add_(0, token_of[:start], y.to(out.dtype))


def _project(x: torch.Tensor, weight: "torch.Tensor | nn.Module") -> torch.Tensor:
    return weight(x) if isinstance(weight, nn.Module) else x @ weight.t()


def is_linearised(experts: nn.Module) -> bool:
    """llm-compressor's linearised experts: `experts[e]` has gate_proj / up_proj / down_proj Linears."""
    return (isinstance(experts, nn.ModuleList) and hasattr(experts, "num_experts") and len(experts) > 0
            and all(isinstance(getattr(experts[0], p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")))


def linear_expert_weights(experts: nn.Module) -> ExpertWeights:
    """The weights of linearised experts (a width-0 expert, as `HEAPrPruningModifier` leaves it, is None)."""

    def weights(e: int):
        expert = experts[e]
        if not hasattr(expert, "gate_proj"):
            return None
        return expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight

    return weights


def fused_expert_weights(experts: nn.Module) -> ExpertWeights:
    """Per-expert views into transformers' fused `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`."""
    width = experts.gate_up_proj.shape[1] // 2

    def weights(e: int):
        gate_up = experts.gate_up_proj[e]
        return gate_up[:width], gate_up[width:], experts.down_proj[e]

    return weights


def expert_parts(experts: nn.Module) -> "tuple[ExpertWeights, Callable | None, Callable | None]":
    """(weights, act_fn, glu) of a transformers experts module: the standard fused layout, gpt-oss's
    (heapr_serve.score.gpt_oss: biases, interleaved gate/up, clamped SwiGLU), or llm-compressor's
    linearised one."""
    from heapr_serve.score import gpt_oss

    if is_linearised(experts):
        return linear_expert_weights(experts), experts.act_fn, None
    if gpt_oss.is_gpt_oss_experts(experts):
        return gpt_oss.expert_weights(experts), None, gpt_oss.clamped_swiglu(experts.alpha, experts.limit)
    return fused_expert_weights(experts), experts.act_fn, None


def expert_shape(experts: nn.Module) -> tuple[int, int, int]:
    """(experts, hidden, dense width) of a dense experts module, whatever its layout."""
    weights, _, _ = expert_parts(experts)
    down = weights(0)[2]  # [H, I]
    return experts.num_experts, down.shape[0], down.shape[1]


def _fused_forward(self, hidden_states, top_k_index, top_k_weights):
    weights, act_fn, glu = expert_parts(self)
    return sorted_moe_forward(hidden_states, top_k_index, top_k_weights, weights, act_fn, self.num_experts, glu=glu)


def use_sorted_forward(model: nn.Module) -> int:
    """Give every fused experts module of `model` the sorted forward (same maths, faster on CPU).

    Returns how many modules were patched (used by training; calibration attaches observers instead).
    """
    patched = 0
    for module in model.modules():
        if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and (hasattr(module, "act_fn") or hasattr(module, "alpha")):
            module.forward = types.MethodType(_fused_forward, module)
            patched += 1
    return patched
