"""The calibration statistics and their file, `heapr_scores.safetensors` (design §1).

For atomic expert k of expert i, HEAPr's score is mean_t a_{t,k}^2 * d_k^T Gbar_i d_k, with Gbar_i the
mean outer product of the gradients at the expert's output. Since d_k^T g_t = dL/da_{t,k}, the score is
exactly mean_t a_{t,k}^2 * mean_t (dL/da_{t,k})^2: two float32 sums of squares per atomic expert and a
token count per expert (heapr_serve.score.observers fills them). Sums, so batches, ranks and resumed
runs combine by addition.

`fisher` (optional: files of older versions lack it) is the exact empirical Fisher of each atomic
expert's output scale, sum_t (a_{t,k} * dL/da_{t,k})^2: the product inside the sum, where HEAPr's score
is the product of two means (`--method fisher`, heapr_serve.prune.methods).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from heapr_serve.errors import HeaprError

SCORES_FILE = "heapr_scores.safetensors"
# Metadata key holding per-expert sums of w * ||y|| (REAP's numerator), kept in the JSON metadata so
# the file stays readable by every `ExpertStats.load`.
REAP_KEY = "reap_weighted_norm_sum"


@dataclass
class ExpertStats:
    """Per MoE layer: sum of a^2, of (dL/da)^2 and of (a dL/da)^2 per atomic expert [E, I], tokens per
    expert [E]."""

    act_sq: dict[int, torch.Tensor] = field(default_factory=dict)
    grad_sq: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    fisher: dict[int, torch.Tensor] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, shapes: dict[int, tuple[int, int]], device="cpu") -> "ExpertStats":
        stats = cls()
        for layer, (experts, width) in shapes.items():
            stats.act_sq[layer] = torch.zeros(experts, width, dtype=torch.float32, device=device)
            stats.grad_sq[layer] = torch.zeros(experts, width, dtype=torch.float32, device=device)
            stats.tokens[layer] = torch.zeros(experts, dtype=torch.int64, device=device)
            stats.fisher[layer] = torch.zeros(experts, width, dtype=torch.float32, device=device)
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
        return sum(t.numel() * t.element_size() for d in (self.act_sq, self.grad_sq, self.tokens, self.fisher) for t in d.values())

    def save(self, path: Path) -> None:
        tensors = {}
        for layer in self.act_sq:
            tensors[f"layers.{layer}.act_sq"] = self.act_sq[layer].cpu().contiguous()
            tensors[f"layers.{layer}.grad_sq"] = self.grad_sq[layer].cpu().contiguous()
            tensors[f"layers.{layer}.tokens"] = self.tokens[layer].cpu().contiguous()
            if layer in self.fisher:
                tensors[f"layers.{layer}.fisher"] = self.fisher[layer].cpu().contiguous()
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
        if not stats.act_sq or set(stats.act_sq) != set(stats.grad_sq) or set(stats.act_sq) != set(stats.tokens) \
                or (stats.fisher and set(stats.fisher) != set(stats.act_sq)):
            raise HeaprError(f"{path}: incomplete HEAPr scores file; re-run `heapr-serve compress`")
        return stats
