"""HEAPr statistics in one forward and one backward pass (design §1).

For atomic expert k of expert i, HEAPr's score is mean_t a_{t,k}^2 * d_k^T Gbar_i d_k, with Gbar_i the
mean outer product of the gradients at the expert's output. Since d_k^T g_t = dL/da_{t,k}, the score is
exactly mean_t a_{t,k}^2 * mean_t (dL/da_{t,k})^2: two float32 sums of squares per atomic expert and a
token count per expert, filled by a hook on the activation. No H x H matrix and no weight gradient
is ever formed (all parameters are frozen; the input embeddings carry the gradient).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from heapr_serve.errors import HeaprError
from heapr_serve.families import moe_blocks
from heapr_serve.moe_forward import use_sorted_forward

SCORES_FILE = "heapr_scores.safetensors"


@dataclass
class ExpertStats:
    """Per MoE layer: sum of a^2 and of (dL/da)^2 per atomic expert [E, I], tokens per expert [E]."""

    act_sq: dict[int, torch.Tensor] = field(default_factory=dict)
    grad_sq: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, shapes: dict[int, tuple[int, int]], device="cpu") -> "ExpertStats":
        stats = cls()
        for layer, (experts, width) in shapes.items():
            stats.act_sq[layer] = torch.zeros(experts, width, dtype=torch.float32, device=device)
            stats.grad_sq[layer] = torch.zeros(experts, width, dtype=torch.float32, device=device)
            stats.tokens[layer] = torch.zeros(experts, dtype=torch.int64, device=device)
        return stats

    def scores(self) -> dict[int, torch.Tensor]:
        """s_k = mean a^2 * mean (dL/da)^2; NaN for experts that received no tokens."""
        out = {}
        for layer, act in self.act_sq.items():
            n = self.tokens[layer].to(torch.float64).unsqueeze(-1)
            score = (act.double() / n) * (self.grad_sq[layer].double() / n)
            out[layer] = torch.where(n > 0, score, torch.full_like(score, float("nan")))
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.act_sq, self.grad_sq, self.tokens) for t in d.values())

    def save(self, path: Path) -> None:
        tensors = {}
        for layer in self.act_sq:
            tensors[f"layers.{layer}.act_sq"] = self.act_sq[layer].cpu().contiguous()
            tensors[f"layers.{layer}.grad_sq"] = self.grad_sq[layer].cpu().contiguous()
            tensors[f"layers.{layer}.tokens"] = self.tokens[layer].cpu().contiguous()
        save_file(tensors, str(path), metadata={"heapr": json.dumps(self.metadata)})

    @classmethod
    def load(cls, path: Path) -> "ExpertStats":
        path = Path(path)
        if path.is_dir():
            path = path / SCORES_FILE
        if not path.is_file():
            raise HeaprError(f"{path}: no HEAPr scores file; pass a {SCORES_FILE} or a folder written by `heapr-serve compress`")
        stats = cls()
        try:
            with safe_open(path, "pt") as f:
                stats.metadata = json.loads((f.metadata() or {}).get("heapr", "{}"))
                for name in f.keys():
                    _, layer, kind = name.split(".")
                    getattr(stats, kind)[int(layer)] = f.get_tensor(name)
        except (ValueError, OSError, KeyError, AttributeError, SafetensorError) as err:
            raise HeaprError(f"{path}: not a HEAPr scores file ({err})") from None
        if not stats.act_sq or set(stats.act_sq) != set(stats.grad_sq) or set(stats.act_sq) != set(stats.tokens):
            raise HeaprError(f"{path}: incomplete HEAPr scores file; re-run `heapr-serve compress`")
        return stats


class TokenMaskedObserver:
    """Base for observers that must ignore padding: `token_mask` (flattened attention mask of the
    current batch) is set before each forward pass."""

    token_mask: torch.Tensor | None = None

    def real(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Row selector for the non-padding tokens, or None when every token is real."""
        if self.token_mask is None:
            return None
        keep = self.token_mask[tokens].bool()
        return None if bool(keep.all()) else keep


class _HeaprObserver(TokenMaskedObserver):
    """Adds a^2 in the forward pass and (dL/da)^2 from a hook in the backward pass."""

    def __init__(self, stats: ExpertStats, layer: int):
        self.act_sq = stats.act_sq[layer]
        self.grad_sq = stats.grad_sq[layer]
        self.tokens = stats.tokens[layer]

    def observe(self, expert, tokens, activation, output, route_weights) -> None:
        keep = self.real(tokens)
        a = activation.detach().float()
        if keep is not None:
            a = a[keep]
        self.act_sq[expert] += (a * a).sum(0)
        self.tokens[expert] += a.shape[0]
        if activation.requires_grad:
            grad_sq = self.grad_sq[expert]

            def accumulate(grad: torch.Tensor) -> None:
                g = grad.detach().float()
                grad_sq.add_((g if keep is None else g[keep]).pow(2).sum(0))

            activation.register_hook(accumulate)


def loss_on_batch(model, input_ids, attention_mask, labels, loss_scale: float) -> torch.Tensor:
    """Next-token cross-entropy summed over tokens and divided by one fixed constant for every batch,
    so that batches of different lengths or padding weigh the same per token; the input embeddings
    carry the gradient so no parameter needs one."""
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss / loss_scale


def prepare_for_scoring(model) -> dict[int, torch.nn.Module]:
    """Freeze all parameters, switch experts to the sorted forward; return the MoE blocks."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    use_sorted_forward(model)
    return moe_blocks(model)


def set_token_mask(blocks, attention_mask: torch.Tensor) -> None:
    """Tell every block's observer which flattened tokens of the next batch are padding."""
    flat = attention_mask.reshape(-1)
    for block in blocks.values():
        observer = getattr(block.experts, "heapr_observer", None)
        if observer is not None:
            observer.token_mask = flat


def collect_stats(model, batches, loss_scale: float, progress=None) -> ExpertStats:
    """One forward and one backward pass per batch; `batches` yields (input_ids, attention_mask, labels)."""
    blocks = prepare_for_scoring(model)
    device = next(model.parameters()).device
    stats = ExpertStats.zeros(
        {layer: (b.experts.num_experts, b.experts.down_proj.shape[-1]) for layer, b in blocks.items()}, device
    )
    for layer, block in blocks.items():
        block.experts.heapr_observer = _HeaprObserver(stats, layer)
    try:
        for input_ids, attention_mask, labels in batches:
            set_token_mask(blocks, attention_mask.to(device))
            loss = loss_on_batch(model, input_ids.to(device), attention_mask.to(device), labels.to(device), loss_scale)
            loss.backward()
            if progress is not None:
                progress(int(attention_mask.sum()))
    finally:
        for block in blocks.values():
            block.experts.heapr_observer = None
    return stats
