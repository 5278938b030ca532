"""`--heal-e2e`: after block-wise healing, a short end-to-end logit distillation (KL to the dense model).

Block-wise healing makes each layer reproduce the dense layer's output, in squared error, one layer at
a time; what the user cares about is the next-token distribution at the top. Here the whole pruned
model (every MoE block's kept weights at their kept widths and its router, as heapr_serve.prune.heal
tunes them; everything else frozen) is tuned with Adam to minimise KL(dense || pruned) of the logits
on the calibration tokens, with the dense model as the teacher beside it. Whole calibration batches
are held out to stop on, and the best held-out state is kept. It needs both models in memory, so
it is for models that fit (the command refuses it with --streamed and under torchrun).
"""

from __future__ import annotations

import math
import torch

from heapr_serve.errors import HeaprError
from heapr_serve.families import Family, moe_blocks
from heapr_serve.progress import console
from heapr_serve.prune.allocation import PruningPlan
from heapr_serve.prune.heal import HealOptions, _Trainable
from heapr_serve.prune.updates import apply_kept_values
from heapr_serve.prune.relative_adam import RelativeAdam
from heapr_serve.prune.updates import LayerUpdates
from heapr_serve.score.moe_forward import use_sorted_forward

EVAL_EVERY = 20
PATIENCE = 5


def _kl(student, teacher, batch, device) -> torch.Tensor:
    """Mean over real tokens of KL(teacher || student) of the next-token distributions."""
    ids, mask, _ = batch
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    s = student(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1)[mask.bool()].mean()


def distill(load_model, family: Family, plan: PruningPlan, updates: LayerUpdates, batches: list,
            dtype: torch.dtype, device: torch.device, opts: HealOptions, source_dtype: torch.dtype) -> dict:
    """Tune the pruned model built from the dense one, `plan` and the block-healed `updates`; the new
    values replace `updates`' layers. Returns the held-out KL before and after, and the steps taken."""
    teacher = load_model(dtype, device)
    student = load_model(dtype, device)
    for model in (teacher, student):
        use_sorted_forward(model)
        for p in model.parameters():
            p.requires_grad_(False)
    blocks = moe_blocks(student)
    trainables = {}
    for layer, kept in plan.keep.items():
        block = blocks[layer]
        healed = {key: updates.get(layer, key) for key in _keys(kept)}
        apply_kept_values(block, family, kept, {k: v for k, v in healed.items() if v is not None})
        trainables[layer] = _Trainable(block, family, kept, opts.router)
    params = [p for t in trainables.values() for p in t.parameters()]
    optimizer = RelativeAdam(params, opts.e2e_lr)
    held = max(1, round(opts.holdout * len(batches)))
    train, held_out = batches[:-held], batches[-held:]
    if not train:
        raise HeaprError("--heal-e2e needs at least two calibration batches (one held out); raise --nsamples")

    def held_kl() -> float:
        with torch.no_grad():
            return sum(float(_kl(student, teacher, b, device)) for b in held_out) / len(held_out)

    before = held_kl()
    best, best_state, since, steps = before, [p.detach().clone() for p in params], 0, 0
    warmup = max(1, opts.e2e_steps // 10)
    with torch.enable_grad():
        for step in range(opts.e2e_steps):
            loss = _kl(student, teacher, train[step % len(train)], device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step(min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / opts.e2e_steps)))
            steps = step + 1
            if steps % EVAL_EVERY == 0 or steps == opts.e2e_steps:
                now = held_kl()
                if now < best:
                    best, since = now, 0
                    with torch.no_grad():
                        for s, p in zip(best_state, params):
                            s.copy_(p)
                else:
                    since += 1
                    if since >= PATIENCE:
                        break
    with torch.no_grad():
        for p, s in zip(params, best_state):
            p.copy_(s)
    # another stage's values: a resumed run heals these layers block-wise again rather than take them for that stage's
    identity = {**(updates.identity or {}), "stage": "e2e"}
    for layer, trainable in trainables.items():
        updates.put(layer, trainable.close(source_dtype), identity)
    console.print(f"heal end to end: held-out KL to the dense model {before:.4g} -> {best:.4g} "
                  f"({(best / before - 1) if before > 0 else 0:+.1%}), {steps} steps", highlight=False)
    return {"held_out_kl_before": round(before, 6), "held_out_kl_after": round(best, 6), "steps": steps}


def _keys(kept) -> list[str]:
    return ["router"] + [f"{e}.{p}" for e, k in enumerate(kept) if len(k) for p in ("gate", "up", "down")]
