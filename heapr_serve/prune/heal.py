"""`--heal`: tune every pruned MoE layer's kept weights so that it reproduces the dense layer (design §9).

Pruning removes neurons; the neurons that stay were trained to work *with* the removed ones. Block-wise
distillation (BRECQ, OmniQuant, EfficientQAT's block-AP) lets them take over: for MoE layer l, with
inputs X_l from the already-healed pruned model (sequential, so layer l also absorbs the drift of
layers < l) and target Y_l = the *dense* MoE block applied to the same X_l,

    minimise  sum_t ||f_pruned(x_t) - y_t||^2 / sum_t ||y_t||^2

over the kept gate rows, up rows and down columns of every routed expert (at their kept widths: the
compute is the pruned model's, not the dense one's) and, by default, the router, with Adam on a
float32 master copy. The learning rate is relative to each tensor's RMS (Adam's step is about lr
whatever the gradient's scale), warms up linearly over the first tenth of the steps, then decays on a cosine, and a held-out share of the calibration
sequences stops the run when its error stops falling; the best held-out state is kept, and a layer
that healing would not improve on held-out tokens keeps its values. Only values change: the
checkpoint format and the served function stay.

One decoder layer is resident (heapr_serve.score.streamed), with that layer's MoE inputs and dense
outputs and one optimizer state, never all layers'. Under torchrun each rank draws its minibatches
from its own share of the tokens and the gradients are averaged across ranks every step, so all
ranks take the same steps and continue with the same healed layer. Every healed layer is saved at
once (heapr_serve.prune.updates), so an interrupted run resumes at the first layer not yet healed.
"""

from __future__ import annotations

import math
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from heapr_serve.errors import HeaprError
from heapr_serve.families import Family
from heapr_serve.progress import console
from heapr_serve.prune.allocation import PruningPlan
from heapr_serve.prune.reconstruct import GramObserver, refit_down
from heapr_serve.prune.relative_adam import RelativeAdam
from heapr_serve.prune.updates import LayerUpdates, apply_kept_values
from heapr_serve.score import distributed
from heapr_serve.score.moe_forward import sorted_moe_forward
from heapr_serve.score.streamed import StreamedPass


TARGETS = ("layer", "stream")
DEFAULT_E2E_STEPS = 300  # --heal-e2e's default (docs/quality.md, "Healing")
MAX_HOLDOUT_TOKENS = 8192  # per layer, over all ranks: --heal-holdout's share, up to this many tokens


@dataclass(frozen=True)
class HealOptions:
    """The defaults were chosen by the sweep in docs/quality.md (bundled model, 0.5 and 0.75)."""

    steps: int = 400  # at most this many Adam steps per layer
    lr: float = 3e-3  # relative to each tensor's RMS
    router: bool = True  # tune the router too (it can re-route around removed capacity)
    batch_tokens: int = 1024  # tokens per step (per rank)
    holdout: float = 0.1  # share of calibration sequences held out for stopping
    eval_every: int = 25
    patience: int = 4  # evaluations without a held-out improvement before stopping
    seed: int = 0
    e2e_steps: int = 0  # then this many steps (at most) of end-to-end logit distillation (heapr_serve.prune.distill)
    e2e_lr: float = 3e-2  # its learning rate, relative to each tensor's RMS
    target: str = "layer"  # layer: the dense layer on the pruned inputs; stream: the dense model's own next state
    epochs: float = 4.0  # steps per layer: this many passes over the training tokens, up to `steps`

    def check(self) -> None:
        if self.steps < 1:
            raise HeaprError(f"--heal-steps must be at least 1 (got {self.steps})")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise HeaprError(f"--heal-epochs must be a positive number of passes over the training tokens (got {self.epochs}); "
                             f"{HealOptions.epochs:g} is the default")
        if not (0 < self.lr < 1):
            raise HeaprError(f"--heal-lr must be in (0, 1), relative to each weight's RMS (got {self.lr}); {HealOptions.lr:g} is the default")
        if not (0 < self.e2e_lr < 1):
            raise HeaprError(f"--heal-e2e-lr must be in (0, 1), relative to each weight's RMS (got {self.e2e_lr}); {HealOptions.e2e_lr:g} is the default")
        if self.e2e_steps < 0:
            raise HeaprError(f"--heal-e2e-steps must be at least 0 (got {self.e2e_steps})")
        if self.batch_tokens < 1:
            raise HeaprError(f"--heal-batch-tokens must be at least 1 (got {self.batch_tokens})")
        if self.target not in TARGETS:
            raise HeaprError(f"--heal-target {self.target!r}: use one of {', '.join(TARGETS)}")
        if not (0 < self.holdout < 1):
            raise HeaprError(f"--heal-holdout must be in (0, 1) (got {self.holdout}); {HealOptions.holdout:g} is the default")

    def record(self) -> dict:
        return asdict(self)


class _BlockRecorder(GramObserver):
    """The MoE block's input and output rows of every real token, per sequence (and, for
    `--reconstruct --heal`, the experts' Gram sums that the least-squares start needs)."""

    def __init__(self, block: nn.Module, gram: bool, held_from: int):
        super().__init__()
        self.block, self.gram_wanted, self.held_from = block, gram, held_from
        self.inputs: list[torch.Tensor] = []  # one [n_real, H] per sequence, calibration dtype, host
        self.outputs: list[torch.Tensor] = []
        self._hook = None
        self._mask = None

    def attach(self, blocks) -> None:
        super().attach(blocks)
        self._hook = self.block.register_forward_hook(self._record)

    def detach(self, layers=None) -> None:
        super().detach(layers)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def begin_batch(self, attention_mask) -> None:
        """The Gram sums skip held-out sequences: a least-squares start fitted on them would make the
        held-out error an in-sample one, which no step on the training tokens could then improve."""
        self._mask = attention_mask.bool()
        first = len(self.inputs)  # sequences recorded so far: this batch's rows follow them
        held = torch.arange(first, first + attention_mask.shape[0], device=attention_mask.device) >= self.held_from
        super().begin_batch(attention_mask * ~held.unsqueeze(-1))

    def allocate(self, layer, experts) -> None:
        if self.gram_wanted:
            super().allocate(layer, experts)

    def observe(self, layer, expert, tokens, activation, output, route_weights) -> None:
        if self.gram_wanted:
            super().observe(layer, expert, tokens, activation, output, route_weights)

    def _record(self, module, args, output) -> None:
        x = args[0] if args else None
        y = output[0] if isinstance(output, tuple) else output
        rows, seq = self._mask.shape
        x, y = x.reshape(rows, seq, -1), y.reshape(rows, seq, -1)
        for r in range(rows):
            real = self._mask[r]
            self.inputs.append(x[r][real].detach().to("cpu", copy=True))
            self.outputs.append(y[r][real].detach().to("cpu", copy=True))


def _compact_forward(params, self, hidden_states, top_k_index, top_k_weights):
    """The routed experts at their kept widths (a width-0 expert adds exactly zero)."""
    return sorted_moe_forward(hidden_states, top_k_index, top_k_weights, lambda e: params.get(e), self.act_fn, self.num_experts)


class _Trainable:
    """A MoE block's kept weights as float32 parameters, in place of its fused experts while healing."""

    def __init__(self, block: nn.Module, family: Family, kept: list[torch.Tensor], router: bool):
        self.block, self.kept = block, kept
        experts = block.experts
        width = experts.gate_up_proj.shape[1] // 2
        self.experts: dict[int, tuple[nn.Parameter, ...]] = {}
        for e, k in enumerate(kept):
            if len(k):
                gate_up = experts.gate_up_proj[e].detach().float()
                down = experts.down_proj[e].detach().float()
                self.experts[e] = tuple(nn.Parameter(t.index_select(dim, k.to(t.device)).clone())
                                        for t, dim in ((gate_up[:width], 0), (gate_up[width:], 0), (down, 1)))
        # only the router's weight: it is what the checkpoint stores (a score-correction bias stays)
        self.router_params = [getattr(block, family.router).weight] if router else []
        self._dtype = experts.down_proj.dtype
        # The dense experts are not read while training (the targets are recorded): free them, so the
        # float32 copies, gradients and Adam state take their place instead of joining them; close()
        # writes the tuned values back into zeroed tensors of the dense shape.
        self._dense_shapes = (experts.gate_up_proj.shape, experts.down_proj.shape)
        for t in (experts.gate_up_proj, experts.down_proj):
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        block.float()
        for p in self.router_params:
            p.requires_grad_(True)
        self._previous = experts.__dict__.get("forward")  # the sorted forward, restored on close
        experts.forward = types.MethodType(lambda s, *a: _compact_forward(self.experts, s, *a), experts)

    def parameters(self) -> list[nn.Parameter]:
        return [p for ps in self.experts.values() for p in ps] + self.router_params

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    def save(self, state: list[torch.Tensor]) -> None:
        """Into `state`'s buffers: a fresh clone per improvement would hold two copies for a moment."""
        with torch.no_grad():
            for s, p in zip(state, self.parameters()):
                s.copy_(p)

    def load(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.parameters(), state):
                p.copy_(s)

    def close(self, rounded_to: torch.dtype) -> dict[str, torch.Tensor]:
        """Write the tuned values back into the block (pruned neurons zero, values rounded to the
        checkpoint's dtype, as the next layer will see them) and return them by update key."""
        experts = self.block.experts
        if self._previous is None:
            del experts.forward
        else:
            experts.forward = self._previous
        for p in self.router_params:
            p.requires_grad_(False)
        self.block.to(self._dtype)
        for t, shape in zip((experts.gate_up_proj, experts.down_proj), self._dense_shapes):
            t.data = torch.zeros(shape, dtype=self._dtype, device=t.device)  # pruned neurons and width-0 experts stay zero
        width = experts.gate_up_proj.shape[1] // 2
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for e, (gate, up, down) in self.experts.items():
                k = self.kept[e].to(experts.down_proj.device)
                for name, t in (("gate", gate), ("up", up), ("down", down)):
                    tensors[f"{e}.{name}"] = t.detach().to(rounded_to)
                experts.gate_up_proj[e, :width].index_copy_(0, k, tensors[f"{e}.gate"].to(self._dtype))
                experts.gate_up_proj[e, width:].index_copy_(0, k, tensors[f"{e}.up"].to(self._dtype))
                experts.down_proj[e].index_copy_(1, k, tensors[f"{e}.down"].to(self._dtype))
            for p in self.router_params:
                tensors["router"] = p.detach().to(rounded_to)
                p.copy_(tensors["router"].to(p.dtype))
        return tensors


def _error(block: nn.Module, x: list[torch.Tensor], y: list[torch.Tensor], device, chunk: int = 4096) -> tuple[float, float]:
    """(sum ||f(x) - y||^2, sum ||y||^2) over the rows of x and y."""
    err = energy = 0.0
    with torch.no_grad():
        for xs, ys in zip(x, y):
            for start in range(0, xs.shape[0], chunk):
                xb = xs[start:start + chunk].to(device).float()
                yb = ys[start:start + chunk].to(device).float()
                out = block(xb.unsqueeze(0))
                out = (out[0] if isinstance(out, tuple) else out).reshape(yb.shape)
                err += float((out - yb).pow(2).sum())
                energy += float(yb.pow(2).sum())
    return err, energy


def _grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _reduced(ranks, values: list[float], device) -> list[float]:
    if ranks.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    distributed.all_reduce_sums(ranks, {"v": t}, device)
    return t.tolist()


def heal_layer(block: nn.Module, trainable: _Trainable, train: tuple[torch.Tensor, torch.Tensor],
               held: tuple[list[torch.Tensor], list[torch.Tensor]], opts: HealOptions, device, ranks, layer: int) -> dict:
    """Adam on `trainable` until the held-out error stops falling; the best held-out state stays."""
    x, y = train
    generator = torch.Generator().manual_seed(opts.seed * 1000003 + layer)
    energy = _reduced(ranks, [float(y.double().pow(2).sum()), float(y.shape[0])], device)
    mean_energy = energy[0] / max(energy[1], 1.0)
    total = planned_steps(opts, int(energy[1]), ranks.world)
    params = trainable.parameters()
    optimizer = RelativeAdam(params, opts.lr)

    def held_out() -> float:
        err, en = _reduced(ranks, list(_error(block, *held, device)), device)
        return err / en if en > 0 else 0.0

    before = held_out()
    best, best_state, since, steps = before, trainable.state(), 0, 0
    batch = min(opts.batch_tokens, x.shape[0])
    warmup = max(1, total // 10)  # Adam's first steps move every weight by ~lr, whatever its gradient
    for step in range(total):
        idx = torch.randint(0, x.shape[0], (batch,), generator=generator)
        xb, yb = x[idx].to(device).float(), y[idx].to(device).float()
        out = block(xb.unsqueeze(0))
        out = (out[0] if isinstance(out, tuple) else out).reshape(yb.shape)
        loss = (out - yb).pow(2).sum() / (batch * mean_energy)
        optimizer.zero_grad()
        loss.backward()
        if ranks.world > 1:  # an expert no token of this rank's minibatch reached has no gradient yet: zero
            grads = [_grad(p) for p in params]
            distributed.all_reduce_flat(ranks, grads, device)
            for g in grads:
                g /= ranks.world
        optimizer.step(min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total)))
        steps = step + 1
        if steps % opts.eval_every == 0 or steps == total:
            now = held_out()
            if now < best:
                best, since = now, 0
                trainable.save(best_state)
            else:
                since += 1
                if since >= opts.patience:
                    break
    trainable.load(best_state)
    return {"held_out_before": before, "held_out_after": best, "steps": steps}


def planned_steps(opts: HealOptions, train_tokens: int, world: int) -> int:
    """`--heal-epochs` passes over the training tokens of all ranks (each rank a batch a step), at most
    `--heal-steps`: healing's cost then follows calibration's, and a small calibration set is not
    fitted for hundreds of steps it can only be over-fitted by (docs/quality.md, "Healing")."""
    per_step = opts.batch_tokens * world
    return max(1, min(opts.steps, math.ceil(opts.epochs * train_tokens / per_step)))


def holdout_cut(lengths: list[int], holdout: float, max_tokens: int) -> int:
    """The first held-out sequence: whole sequences are held out (tokens of one sequence are alike),
    the last share of them, and no more than `max_tokens` tokens of them, so evaluating them is a
    fixed cost, not one that grows with the calibration set (the sequences before the cut train)."""
    n = len(lengths)
    held = max(1, round(holdout * n)) if n > 1 else 0
    tokens = torch.tensor(lengths[n - held:], dtype=torch.int64).flip(0).cumsum(0)
    held = max(1, int((tokens <= max_tokens).sum())) if held else 0
    if n - held == 0:
        raise HeaprError("--heal needs at least two calibration sequences per rank (one held out); raise --nsamples")
    return n - held


def _split(recorder: _BlockRecorder):
    cut = recorder.held_from
    train = (torch.cat(recorder.inputs[:cut]), torch.cat(recorder.outputs[:cut]))
    return train, (recorder.inputs[cut:], recorder.outputs[cut:])


def heal(source: Path, family: Family, plan: PruningPlan, batches: list, dtype: torch.dtype, device: torch.device,
         folder: Path, opts: HealOptions, identity: dict, reconstruct_damp: float | None = None,
         activations_dir: Path | None = None, on_layer=None) -> LayerUpdates:
    """Heal every pruned MoE layer of `plan` on this rank's `batches`, in order; the new values go to
    `folder` (a layer already there for the same run `identity` is loaded instead of healed again).
    With `reconstruct_damp`, each expert's down projection starts from its least-squares re-fit."""
    ranks = distributed.ranks_from_env()
    updates = LayerUpdates(Path(folder), {"layers": {}}, identity)
    calibration = StreamedPass(source, dtype, device, activations_dir, on_step=on_layer)
    source_dtype = calibration.source.dtype
    dense_stream: dict[int, torch.Tensor] = {}  # target "stream": the dense model's state entering this layer

    def visit(layer: int, module, v) -> bool:
        dense_next = _advance_dense(module, v, dense_stream, layer) if opts.target == "stream" else None
        if layer not in plan.keep:
            return False
        block = module.mlp
        dense_width = block.experts.down_proj.shape[-1]
        kept = plan.keep[layer]
        if all(len(k) == dense_width for k in kept):
            return False  # nothing pruned here: the dense layer is its own optimum
        done = updates.load(layer, identity)
        if done is not None:
            apply_kept_values(block, family, kept, done)
            updates.summary["layers"][str(layer)] = {"resumed": True}
            console.print(f"heal layer {layer}: resumed from {updates.file(layer)}")
            return True
        lengths = [int(row.sum()) for b in range(v.batches) for row in v.masks[b]]
        cut = holdout_cut(lengths, opts.holdout, max(1, MAX_HOLDOUT_TOKENS // ranks.world))
        recorder = _BlockRecorder(block, gram=reconstruct_damp is not None, held_from=cut)
        v.run(recorder)
        if dense_next is not None:
            _add_drift(recorder, v, dense_next)
        if reconstruct_damp is not None:
            distributed.all_reduce_sums(ranks, {f"gram.{layer}": recorder.gram[layer], f"energy.{layer}": recorder.energy[layer]}, device)
            _refit_start(block, kept, recorder.gram.pop(layer), recorder.energy.pop(layer).tolist(), reconstruct_damp)
        train, held = _split(recorder)
        del recorder
        trainable = _Trainable(block, family, kept, opts.router)
        with torch.enable_grad():
            report = heal_layer(block, trainable, train, held, opts, device, ranks, layer)
        tensors = trainable.close(source_dtype)
        del train, held
        updates.put(layer, tensors, identity)
        updates.summary["layers"][str(layer)] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in report.items()}
        if ranks.is_main:
            b, a = report["held_out_before"], report["held_out_after"]
            console.print(f"heal layer {layer}: held-out relative error {b:.4g} -> {a:.4g} "
                          f"({(a / b - 1) if b > 0 else 0:+.1%}), {report['steps']} steps", highlight=False)
        return True

    calibration.forward_by_layer(batches, visit)
    return updates


def _refit_start(block, kept, gram, energy, damp: float) -> None:
    """`--reconstruct --heal`: the least-squares down columns (heapr_serve.prune.reconstruct) as the start."""
    experts = block.experts
    for e, k in enumerate(kept):
        new, _, _ = refit_down(experts.down_proj[e], gram[e], k.to(gram.device), damp, energy[e])
        if new is not None:
            experts.down_proj[e].index_copy_(1, k.to(new.device), new.to(experts.down_proj.dtype))


def _advance_dense(module, v, dense_stream: dict, layer: int) -> list[torch.Tensor]:
    """Target "stream": the dense model's next states (this layer is still dense when visited), and
    the stream moved on to them."""
    nxt = []
    for b in range(v.batches):
        h = dense_stream[b].to(v.device) if b in dense_stream else v.store.get(layer, b, v.device)
        nxt.append(module(h, **v.kwargs[b][layer]).to("cpu"))
    dense_stream.update(enumerate(nxt))
    return nxt


def _add_drift(recorder: _BlockRecorder, v, dense_next: list[torch.Tensor]) -> None:
    """Target "stream": what would bring the pruned model's state back onto the dense model's, i.e. the
    dense layer's output plus the drift (dense model's next state - this layer's output on pruned inputs)."""
    i = 0
    for b in range(v.batches):
        drift = dense_next[b].float() - v.output(b).to("cpu").float()
        mask = v.masks[b].bool().cpu()
        for r in range(drift.shape[0]):
            y = recorder.outputs[i]
            recorder.outputs[i] = (y.float() + drift[r][mask[r]]).to(y.dtype)
            i += 1
