"""What vLLM 0.32's CPU router cannot route, refused before it serves wrong tokens or crashes.

Outside grouped top-k, `CPURouter` knows only softmax top-k: it asserts on any other scoring function
(MiniMax-M2's sigmoid: stock vLLM-CPU cannot serve the dense model either), and it silently drops a
score-correction bias (ERNIE-4.5's `moe_statics`: stock vLLM-CPU routes the dense model without it).
Both are stock-router limits, not the pruned layer's, so the pruned model is refused with the reason;
CUDA's routers handle both. A bias that is all zeros changes nothing and is allowed.
"""

from __future__ import annotations

from torch import nn

from heapr_serve.errors import HeaprError


def check_cpu_routing(model: nn.Module, architecture: str) -> None:
    """Raise HeaprError (one line) if any MoE layer's CPU router would mis-route or fail."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if not isinstance(router, CPURouter) or router.use_grouped_topk or router.custom_routing_function is not None:
            continue
        if router.scoring_func != "softmax":
            raise HeaprError(f"{architecture}: vLLM's CPU router cannot route {router.scoring_func} scores without grouped "
                             "top-k (stock vLLM-CPU fails on the dense model too); serve it on CUDA, or evaluate it with "
                             "`heapr-serve eval` (transformers)")
        bias = router.e_score_correction_bias
        if bias is not None and bool(bias.detach().ne(0).any()):
            raise HeaprError(f"{name}: vLLM's CPU router ignores this model's score-correction bias with softmax routing "
                             "(stock vLLM-CPU mis-routes the dense model too); serve it on CUDA, or evaluate it with "
                             "`heapr-serve eval` (transformers)")
