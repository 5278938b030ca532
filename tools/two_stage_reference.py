"""The paper's two-stage HEAPr definition, kept as the reference that the one-pass method is tested
and benchmarked against: stage 1 forms Gbar_i = mean_t g_t g_t^T (H x H per expert) from the gradient
at each expert's output; stage 2 runs a second forward pass for the activations; then
s_k = mean_t a_{t,k}^2 * d_k^T Gbar_i d_k. Memory is O(E H^2): only for small models. Both stages
plug into the same observer lifecycle and calibration pass as the one-pass method.

`fisher_reference` is the brute-force definition of `--method fisher`: token by token, the activation
times the gradient at the expert's output projected on d_k, squared and summed (float64).
"""

from __future__ import annotations

import torch

from heapr_serve.families import moe_blocks
from heapr_serve.score.calibration_pass import InMemoryPass
from heapr_serve.score.moe_forward import expert_parts, expert_shape
from heapr_serve.score.observers import ExpertObserver


def _downs(experts) -> torch.Tensor:
    """[E, H, I] down projections (column k is d_k), whatever the experts' layout (gpt-oss: [E, I, H])."""
    weights, _, _ = expert_parts(experts)
    return torch.stack([weights(e)[2] for e in range(experts.num_experts)])


class _OutputGradObserver(ExpertObserver):
    """Stage 1: sum over real tokens of g g^T at each expert's output, and the token counts (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.cov, self.counts = {}, {}

    def allocate(self, layer, experts):
        num_experts, hidden, _ = expert_shape(experts)
        device = experts.down_proj.device
        self.cov[layer] = torch.zeros(num_experts, hidden, hidden, dtype=torch.float64, device=device)
        self.counts[layer] = torch.zeros(num_experts, dtype=torch.int64, device=device)

    def observe(self, layer, expert, tokens, activation, output, route_weights):
        self.counts[layer][expert] += self.count(tokens)
        cov = self.cov[layer][expert]
        weight = None if self.token_weight is None else self.token_weight[tokens].double().unsqueeze(-1)
        if output.requires_grad:

            def accumulate(grad: torch.Tensor) -> None:
                g = grad.detach().double()
                g = g if weight is None else g * weight
                cov.add_(g.t() @ g)

            output.register_hook(accumulate)


class _ActivationObserver(ExpertObserver):
    """Stage 2: sum over real tokens of a^2 per atomic expert (float64), forward only."""

    def __init__(self) -> None:
        super().__init__()
        self.act_sq = {}

    def allocate(self, layer, experts):
        num_experts, _, width = expert_shape(experts)
        self.act_sq[layer] = torch.zeros(num_experts, width, dtype=torch.float64, device=experts.down_proj.device)

    def observe(self, layer, expert, tokens, activation, output, route_weights):
        a = self.real_rows(tokens, activation.detach().double())
        self.act_sq[layer][expert] += a.pow(2).sum(0)


def two_stage_scores(model, batches, loss_scale: float) -> dict[int, torch.Tensor]:
    """Per MoE layer, the [E, I] HEAPr scores by the explicit-covariance method (float64 sums)."""
    batches = list(batches)
    calibration = InMemoryPass(model)
    grads, acts = _OutputGradObserver(), _ActivationObserver()
    calibration.run(batches, grads, loss_scale)
    calibration.run(batches, acts, loss_scale, backward=False)
    scores = {}
    for layer, block in moe_blocks(model).items():
        n = grads.counts[layer].double().unsqueeze(-1)
        down = _downs(block.experts).detach().double()  # [E, H, I]; column k is d_k
        gbar = grads.cov[layer] / n.unsqueeze(-1)
        quad = torch.einsum("ehk,ehg,egk->ek", down, gbar, down)  # d_k^T Gbar d_k
        scores[layer] = torch.where(n > 0, (acts.act_sq[layer] / n) * quad, torch.full_like(quad, float("nan")))
    return scores


class _FisherByOutputGradient(ExpertObserver):
    """Per-token, float64: sum_t (a_{t,k} * d_k . g_t)^2 from the gradient g_t at each token's expert
    output and the down-projection column d_k (chain rule by hand, not the activation's gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.fisher, self.counts, self.downs = {}, {}, {}

    def allocate(self, layer, experts):
        num_experts, _, width = expert_shape(experts)
        self.fisher[layer] = torch.zeros(num_experts, width, dtype=torch.float64, device=experts.down_proj.device)
        self.counts[layer] = torch.zeros(num_experts, dtype=torch.int64)
        self.downs[layer] = _downs(experts)

    def observe(self, layer, expert, tokens, activation, output, route_weights):
        self.counts[layer][expert] += self.count(tokens)
        a = self.real_rows(tokens, activation.detach().double())
        down = self.downs[layer][expert].detach().double()  # [H, I]
        fisher = self.fisher[layer][expert]
        if output.requires_grad:

            def accumulate(grad: torch.Tensor) -> None:
                for t in range(a.shape[0]):  # one token at a time: the definition, not a vectorised shortcut
                    fisher.add_((a[t] * (grad[t].double() @ down)) ** 2)

            output.register_hook(accumulate)


def fisher_reference(model, batches, loss_scale: float) -> dict[int, torch.Tensor]:
    """Per MoE layer, [E, I] sum over real tokens of (a_k dL/da_k)^2 (float64), NaN where no tokens."""
    observer = _FisherByOutputGradient()
    InMemoryPass(model).run(list(batches), observer, loss_scale)
    return {layer: torch.where(observer.counts[layer].unsqueeze(-1) > 0, fisher, torch.full_like(fisher, float("nan")))
            for layer, fisher in observer.fisher.items()}
