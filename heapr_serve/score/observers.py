"""Observers of the routed experts, with one lifecycle: attach -> calibrate -> detach.

An observer is attached to MoE blocks (their experts run the sorted forward, which hands the observer
each expert's routed tokens, activation a = act(G x) * (U x), output y = D a and router weights), sees
every batch of the calibration pass, and is detached again, which restores every patched `forward`.
The calibration pass (heapr_serve.score.calibration_pass) decides when blocks exist: all at once for
a model in memory, one at a time when layers are streamed. Padding never counts: `begin_batch` gives
the attention mask, and padded rows are multiplied by zero (no host synchronisation per expert).
"""

from __future__ import annotations

import types
from functools import partial

import torch
from torch import nn

from heapr_serve.errors import HeaprError
from heapr_serve.score.moe_forward import expert_parts, expert_shape, sorted_moe_forward
from heapr_serve.score.stats import REAP_KEY, ExpertStats


def _observed_forward(observe, self, hidden_states, top_k_index, top_k_weights):
    weights, act_fn, glu = expert_parts(self)
    return sorted_moe_forward(hidden_states, top_k_index, top_k_weights, weights, act_fn, self.num_experts, observe, glu=glu)


class ExpertObserver:
    """Base class. Subclasses implement `allocate(layer, experts)` (their per-layer sums, once) and
    `observe(layer, expert, tokens, activation, output, route_weights)`."""

    def __init__(self) -> None:
        self.token_weight: torch.Tensor | None = None  # flattened mask of the batch, 1.0 real / 0.0 padding
        self._attached: dict[int, tuple[nn.Module, object]] = {}
        self._allocated: set[int] = set()

    # -- lifecycle -----------------------------------------------------------------------------------

    def attach(self, blocks: dict[int, nn.Module]) -> None:
        """Observe these MoE blocks (decoder-layer index -> block with fused `.experts`)."""
        for layer, block in blocks.items():
            experts = block.experts
            if layer not in self._allocated:
                self.allocate(layer, experts)
                self._allocated.add(layer)
            previous = experts.__dict__.get("forward")  # an instance-level forward to restore, if any
            experts.forward = types.MethodType(partial(_observed_forward, partial(self.observe, layer)), experts)
            self._attached[layer] = (experts, previous)

    def detach(self, layers=None) -> None:
        """Stop observing (all layers, or the given ones) and restore their `forward`."""
        for layer in list(self._attached if layers is None else layers):
            experts, previous = self._attached.pop(layer)
            if previous is None:
                del experts.forward
            else:
                experts.forward = previous

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        """The next forward pass sees this batch; padded positions (mask 0) must not count."""
        flat = attention_mask.reshape(-1)
        self.token_weight = None if bool(flat.all()) else flat.to(torch.float32)

    # -- helpers for subclasses ----------------------------------------------------------------------

    def real_rows(self, tokens: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`values` [n, ...] with the rows of padding tokens zeroed."""
        if self.token_weight is None:
            return values
        w = self.token_weight[tokens]
        return values * w.view(-1, *([1] * (values.dim() - 1)))

    def count(self, tokens: torch.Tensor) -> torch.Tensor | int:
        return tokens.shape[0] if self.token_weight is None else self.token_weight[tokens].sum().to(torch.int64)

    # -- to implement --------------------------------------------------------------------------------

    def allocate(self, layer: int, experts: nn.Module) -> None:
        raise NotImplementedError

    def observe(self, layer, expert, tokens, activation, output, route_weights) -> None:
        raise NotImplementedError


class HeaprObserver(ExpertObserver):
    """HEAPr's statistics (design §1): per atomic expert, sum a^2 in the forward pass and sum (dL/da)^2
    from a hook in the backward pass, and the tokens each expert saw."""

    KINDS = ("act_sq", "grad_sq", "tokens")  # the running sums, by name (what `sums()` returns)

    def __init__(self) -> None:
        super().__init__()
        self.stats = ExpertStats()

    def allocate(self, layer, experts) -> None:
        (num_experts, _, width), device = expert_shape(experts), next(experts.parameters()).device
        self.stats.act_sq[layer] = torch.zeros(num_experts, width, dtype=torch.float32, device=device)
        self.stats.grad_sq[layer] = torch.zeros(num_experts, width, dtype=torch.float32, device=device)
        self.stats.tokens[layer] = torch.zeros(num_experts, dtype=torch.int64, device=device)

    def observe(self, layer, expert, tokens, activation, output, route_weights) -> None:
        a = self.real_rows(tokens, activation.detach().float())
        self.stats.act_sq[layer][expert] += (a * a).sum(0)
        self.stats.tokens[layer][expert] += self.count(tokens)
        if activation.requires_grad:
            weight = None if self.token_weight is None else self.token_weight[tokens].unsqueeze(-1)

            def accumulate(grad: torch.Tensor) -> None:
                g = grad.detach().float()
                self.gradient_sums(layer, expert, a, g if weight is None else g * weight)

            activation.register_hook(accumulate)

    def gradient_sums(self, layer: int, expert: int, a: torch.Tensor, g: torch.Tensor) -> None:
        """Backward-pass sums of one expert's tokens: `a` and `g` = dL/da [n, I], padding rows zero."""
        self.stats.grad_sq[layer][expert].add_(g.pow(2).sum(0))

    def sums(self) -> dict[str, torch.Tensor]:
        """Every running sum by name: what ranks all-reduce and a resumable run checkpoints."""
        out = {}
        for layer in sorted(self.stats.act_sq):
            out[f"act_sq.{layer}"] = self.stats.act_sq[layer]
            out[f"grad_sq.{layer}"] = self.stats.grad_sq[layer]
            out[f"tokens.{layer}"] = self.stats.tokens[layer]
        return out

    def load_sums(self, sums: dict[str, torch.Tensor]) -> None:
        """Continue from saved sums (a resumed run): they replace this observer's, layer by layer."""
        kinds = {name.rsplit(".", 1)[0] for name in sums}
        missing = set(self.KINDS) - kinds
        if missing:
            raise HeaprError(f"the saved calibration state lacks {sorted(missing)} (written by an older heapr-serve); run again without --resume")
        for name, value in sums.items():
            kind, layer = name.rsplit(".", 1)
            self._store(kind)[int(layer)] = value.clone()
            self._allocated.add(int(layer))

    def _store(self, kind: str) -> dict[int, torch.Tensor]:
        return {"act_sq": self.stats.act_sq, "grad_sq": self.stats.grad_sq, "tokens": self.stats.tokens}[kind]

    def result(self) -> ExpertStats:
        return self.stats


class MethodStatsObserver(HeaprObserver):
    """HEAPr's statistics plus the exact empirical Fisher of each atomic expert, sum over real tokens
    of (a * dL/da)^2 (`--method fisher`), and REAP's per-expert sum over real tokens of w * ||y||_2,
    so one pass serves every method of heapr_serve.prune.methods."""

    KINDS = HeaprObserver.KINDS + ("fisher", "reap")

    def __init__(self) -> None:
        super().__init__()
        self.reap: dict[int, torch.Tensor] = {}

    def allocate(self, layer, experts) -> None:
        super().allocate(layer, experts)
        self.stats.fisher[layer] = torch.zeros_like(self.stats.act_sq[layer])
        self.reap[layer] = torch.zeros(experts.num_experts, dtype=torch.float64, device=self.stats.act_sq[layer].device)

    def gradient_sums(self, layer, expert, a, g) -> None:
        super().gradient_sums(layer, expert, a, g)
        self.stats.fisher[layer][expert].add_((a * g).pow(2).sum(0))

    def observe(self, layer, expert, tokens, activation, output, route_weights) -> None:
        super().observe(layer, expert, tokens, activation, output, route_weights)
        norms = output.detach().float().norm(dim=-1) * route_weights.detach().float()
        self.reap[layer][expert] += self.real_rows(tokens, norms).double().sum()

    def sums(self) -> dict[str, torch.Tensor]:
        return {**super().sums(), **{f"fisher.{layer}": f for layer, f in sorted(self.stats.fisher.items())},
                **{f"reap.{layer}": r for layer, r in sorted(self.reap.items())}}

    def _store(self, kind: str) -> dict[int, torch.Tensor]:
        if kind == "reap":
            return self.reap
        return self.stats.fisher if kind == "fisher" else super()._store(kind)

    def result(self) -> ExpertStats:
        self.stats.metadata[REAP_KEY] = {str(layer): r.cpu().tolist() for layer, r in sorted(self.reap.items())}
        return self.stats
