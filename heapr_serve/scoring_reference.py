"""The paper's two-stage HEAPr definition, kept as the reference that the one-pass method is tested
and benchmarked against: stage 1 forms Gbar_i = mean_t g_t g_t^T (H x H per expert) from the gradient
at each expert's output; stage 2 runs a second forward pass for the activations; then
s_k = mean_t a_{t,k}^2 * d_k^T Gbar_i d_k. Memory is O(E H^2): only for small models.
"""

from __future__ import annotations

import torch

from heapr_serve.scoring import TokenMaskedObserver, loss_on_batch, prepare_for_scoring, set_token_mask


class _OutputGradObserver(TokenMaskedObserver):
    def __init__(self, cov: torch.Tensor, counts: torch.Tensor):
        self.cov, self.counts = cov, counts

    def observe(self, expert, tokens, activation, output, route_weights):
        keep = self.real(tokens)
        self.counts[expert] += output.shape[0] if keep is None else int(keep.sum())
        cov = self.cov[expert]
        if output.requires_grad:

            def accumulate(grad: torch.Tensor) -> None:
                g = grad.detach().double()
                g = g if keep is None else g[keep]
                cov.add_(g.t() @ g)

            output.register_hook(accumulate)


class _ActivationObserver(TokenMaskedObserver):
    def __init__(self, act_sq: torch.Tensor):
        self.act_sq = act_sq

    def observe(self, expert, tokens, activation, output, route_weights):
        keep = self.real(tokens)
        a = activation.detach().double()
        self.act_sq[expert] += (a if keep is None else a[keep]).pow(2).sum(0)


def two_stage_scores(model, batches, loss_scale: float) -> dict[int, torch.Tensor]:
    """Per MoE layer, the [E, I] HEAPr scores by the explicit-covariance method (float64 sums)."""
    batches = list(batches)
    blocks = prepare_for_scoring(model)
    device = next(model.parameters()).device
    covs, counts, act_sq = {}, {}, {}
    for layer, block in blocks.items():
        experts, hidden, width = block.experts.down_proj.shape
        covs[layer] = torch.zeros(experts, hidden, hidden, dtype=torch.float64, device=device)
        counts[layer] = torch.zeros(experts, dtype=torch.int64, device=device)
        act_sq[layer] = torch.zeros(experts, width, dtype=torch.float64, device=device)
    try:
        for layer, block in blocks.items():
            block.experts.heapr_observer = _OutputGradObserver(covs[layer], counts[layer])
        for input_ids, attention_mask, labels in batches:
            set_token_mask(blocks, attention_mask.to(device))
            loss_on_batch(model, input_ids.to(device), attention_mask.to(device), labels.to(device), loss_scale).backward()
        for layer, block in blocks.items():
            block.experts.heapr_observer = _ActivationObserver(act_sq[layer])
        with torch.no_grad():
            for input_ids, attention_mask, _ in batches:
                set_token_mask(blocks, attention_mask.to(device))
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    finally:
        for block in blocks.values():
            block.experts.heapr_observer = None
    scores = {}
    for layer, block in blocks.items():
        n = counts[layer].double().unsqueeze(-1)
        down = block.experts.down_proj.detach().double()  # [E, H, I]; column k is d_k
        gbar = covs[layer] / n.unsqueeze(-1)
        quad = torch.einsum("ehk,ehg,egk->ek", down, gbar, down)  # d_k^T Gbar d_k
        scores[layer] = torch.where(n > 0, (act_sq[layer] / n) * quad, torch.full_like(quad, float("nan")))
    return scores
