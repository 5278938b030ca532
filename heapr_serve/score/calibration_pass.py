"""The calibration pass: one forward and one backward pass per batch with an observer attached.

Every implementation has one interface, `run(batches, observer, loss_scale, progress)`, so the
statistics do not depend on how the model is held: `InMemoryPass` runs a whole model resident on one
device. The loss is next-token cross-entropy summed over real tokens and divided by one fixed constant
for every batch, so batches of different lengths or padding weigh the same per token; the input
embeddings carry the gradient, so no parameter ever needs one (all are frozen).
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch

from heapr_serve.families import moe_blocks
from heapr_serve.score.observers import ExpertObserver, MethodStatsObserver
from heapr_serve.score.stats import ExpertStats

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels (-100 on padding)
Progress = Callable[[int], None]  # called with the number of real tokens of each finished batch


class CalibrationPass(Protocol):
    def run(self, batches: Iterable[Batch], observer: ExpertObserver, loss_scale: float,
            progress: Progress | None = None) -> None: ...


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """Summed next-token cross-entropy (float32, padding ignored) divided by `loss_scale`."""
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss / loss_scale


def loss_on_batch(model, input_ids, attention_mask, labels, loss_scale: float) -> torch.Tensor:
    """The calibration loss of one batch through a whole model in memory."""
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
    return next_token_loss(logits, labels, loss_scale)


def freeze(model) -> dict[int, torch.nn.Module]:
    """Eval mode, no parameter gradients; returns the MoE blocks."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return moe_blocks(model)


class InMemoryPass:
    """The whole model resident on its device: one autograd graph per batch."""

    def __init__(self, model) -> None:
        self.model = model

    def run(self, batches, observer, loss_scale, progress=None, backward: bool = True) -> None:
        blocks = freeze(self.model)
        device = next(self.model.parameters()).device
        observer.attach(blocks)
        try:
            for input_ids, attention_mask, labels in batches:
                attention_mask = attention_mask.to(device)
                observer.begin_batch(attention_mask)
                if backward:
                    loss_on_batch(self.model, input_ids.to(device), attention_mask, labels.to(device), loss_scale).backward()
                else:
                    with torch.no_grad():
                        self.model(input_ids=input_ids.to(device), attention_mask=attention_mask, use_cache=False)
                if progress is not None:
                    progress(int(attention_mask.sum()))
        finally:
            observer.detach()


def collect(calibration: CalibrationPass, batches: Iterable[Batch], loss_scale: float,
            observer: ExpertObserver | None = None, progress: Progress | None = None) -> ExpertStats:
    """Run `calibration` with `observer` (default: every method's statistics) and return its sums."""
    observer = observer if observer is not None else MethodStatsObserver()
    calibration.run(batches, observer, loss_scale, progress)
    return observer.result()


def collect_statistics(model, batches: Iterable[Batch], loss_scale: float, progress: Progress | None = None,
                       observer: ExpertObserver | None = None) -> ExpertStats:
    """`collect` over a model held in memory."""
    return collect(InMemoryPass(model), batches, loss_scale, observer, progress)
