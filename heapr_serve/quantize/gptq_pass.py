"""The calibration pass of `--quant-method gptq`: every Linear of every decoder layer, layer by layer.

GPTQ needs, per weight, the Hessian of its inputs on the calibration tokens (heapr_serve.quantize.gptq).
Here a forward-only pass with one decoder layer resident (heapr_serve.score.streamed, the pass
`--reconstruct` and `--heal` use, so `--streamed` keeps its memory bound) visits each layer of the
source: the layer is first made what the pruned checkpoint holds (pruned neurons zero, and the new
values of `--reconstruct` / `--heal` where given), then its inputs are run through it once with hooks
that sum x x^T for the attention and shared-expert projections, for each routed expert's gate and up
(the tokens routed to it) and for its down projection (its activations at the kept neurons only: the
ragged width). Every weight is quantized, written into the layer as the value it now stands for,
and the layer's outputs recomputed, so the next layer calibrates on what the quantized model
computes, as llm-compressor's sequential pipeline does. Each layer's compressed tensors go to a file
at once (heapr_serve.prune.updates' LayerUpdates, keyed by transformers module name). Under torchrun
the Hessians are summed across ranks and every rank quantizes alike.

The routed experts' Hessians (E x H x H float32: for a 64-expert layer of hidden 1024, 256 MiB, as much
as half the layer) are summed in chunks of experts, one pass over the layer's inputs per chunk, so that
the Hessians held at once stay within a tenth of the layer's own weights (HESSIAN_SHARE, at most
HESSIAN_BUDGET): `--streamed` keeps its memory bound with GPTQ. Each expert's Hessians are dropped as
soon as it is quantized. The attention and shared-expert weights are quantized after the last chunk,
so every chunk sees the same layer inputs and the result does not depend on the chunking.
"""

from __future__ import annotations

import re
import types
from functools import partial
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationScheme
from torch import nn

from heapr_serve.families import Family
from heapr_serve.prune.allocation import PruningPlan
from heapr_serve.prune.updates import LayerUpdates, apply_kept_values
from heapr_serve.quantize.gptq import gptq_weight
from heapr_serve.quantize.rtn import pack_weight
from heapr_serve.score import distributed
from heapr_serve.score.observers import ExpertObserver
from heapr_serve.score.streamed import StreamedPass, release_host_memory

HESSIAN_BUDGET = 2 * 1024**3  # bytes of routed-expert Hessians summed at once, at most
HESSIAN_SHARE = 0.1  # ... and at most this share of the decoder layer's weight bytes


def experts_per_chunk(module: nn.Module, num_experts: int, hidden: int, width: int, budget: int | None = None) -> int:
    """Routed experts whose Hessians (gate/up H x H, down width x width, float32) are summed at once."""
    if not num_experts:
        return 1
    if budget is None:
        layer_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        budget = min(HESSIAN_BUDGET, int(HESSIAN_SHARE * layer_bytes))
    return max(1, min(num_experts, budget // (4 * (hidden * hidden + width * width))))


class _Hessians(ExpertObserver):
    """x x^T sums: per Linear module of the layer (forward pre-hooks), and per routed expert of
    `experts` (gate/up over its routed tokens; down over its activations at its kept neurons)."""

    def __init__(self, linears: dict[str, nn.Linear], experts: range, kept: list[torch.Tensor] | None, hidden: int, device):
        super().__init__()
        self.kept, self.experts = kept, experts
        self.linear: dict[str, torch.Tensor] = {}
        self.gate_up = {e: torch.zeros(hidden, hidden, device=device) for e in experts}
        self.down: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._hooks = [m.register_forward_pre_hook(partial(self._linear, name)) for name, m in linears.items()]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def allocate(self, layer, experts) -> None:
        pass  # its sums are made per chunk of experts in __init__, not per layer

    def begin_batch(self, attention_mask) -> None:
        super().begin_batch(attention_mask)
        self._mask = attention_mask.reshape(-1).bool()

    def attach(self, blocks) -> None:
        super().attach(blocks)
        for layer, block in blocks.items():  # keep the experts' input rows: the gate/up Hessians need them
            experts = block.experts
            observed = experts.forward

            def forward(s, hidden_states, *args, _observed=observed):
                self._hidden = hidden_states
                return _observed(hidden_states, *args)
            experts.forward = types.MethodType(forward, experts)

    def _linear(self, name: str, module, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        if self._mask is not None and self._mask.numel() == x.shape[0]:
            x = x[self._mask.to(x.device)]
        x = x.float()
        h = self.linear.get(name)
        self.linear[name] = x.t() @ x if h is None else h.addmm_(x.t(), x)

    def observe(self, layer, expert, tokens, activation, output, route_weights) -> None:
        if expert not in self.gate_up:
            return
        x = self.real_rows(tokens, self._hidden[tokens].float())
        self.gate_up[expert].addmm_(x.t(), x)
        a = self.real_rows(tokens, activation.float())
        if self.kept is not None:
            a = a[:, self.kept[expert].to(a.device)]
        d = self.down.get(expert)
        self.down[expert] = a.t() @ a if d is None else d.addmm_(a.t(), a)


def _linears(module: nn.Module, modules: set[str], prefix: str) -> dict[str, nn.Linear]:
    """The decoder layer's Linear modules that get quantized."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear) and f"{prefix}{name}" in modules}


def gptq_pass(source: Path, family: Family, plan: PruningPlan | None, batches: list, dtype: torch.dtype,
              device: torch.device, folder: Path, scheme: QuantizationScheme, fmt: str, modules: set[str],
              updates=None, activations_dir: Path | None = None, on_layer=None) -> LayerUpdates:
    """GPTQ every Linear of the (pruned) model named in `modules` (transformers module names, routed
    experts as "model.layers.{l}.mlp.experts.{e}.gate_proj"); returns the store of compressed tensors,
    keyed per layer by module name and part ("model.layers.{l}.self_attn.q_proj.weight_packed")."""
    ranks = distributed.ranks_from_env()
    store = LayerUpdates(Path(folder), {"rounded_to_nearest": 0, "weights": 0})
    calibration = StreamedPass(source, dtype, device, activations_dir, on_step=on_layer)
    source_dtype = calibration.source.dtype

    def visit(layer: int, module, v) -> bool:
        prefix = f"model.layers.{layer}."
        block = module.mlp if getattr(module.mlp, "experts", None) is not None else None
        kept = plan.keep.get(layer) if plan is not None else None
        if block is not None and kept is not None:
            new = {}
            if updates is not None:
                for key in ["router"] + [f"{e}.{p}" for e in range(len(kept)) for p in ("gate", "up", "down")]:
                    t = updates(layer, key)
                    if t is not None:
                        new[key] = t
            apply_kept_values(block, family, kept, new)
        linears = _linears(module, modules, prefix)
        tensors: dict[str, torch.Tensor] = {}
        num_experts, hidden = _expert_dims(block)
        width = block.experts.gate_up_proj.shape[1] // 2 if num_experts else 0
        chunk = experts_per_chunk(module, num_experts, hidden, width)
        starts = list(range(0, num_experts, chunk)) or [0]
        linear_hessians: dict[str, torch.Tensor] = {}
        for i, start in enumerate(starts):
            observer = _Hessians(linears if i == 0 else {}, range(start, min(start + chunk, num_experts)), kept, hidden, device)
            try:
                _run(v, observer, block)
            finally:
                observer.close()
            sums = {**{f"l.{n}": h for n, h in observer.linear.items()}, **{f"gu.{e}": h for e, h in observer.gate_up.items()},
                    **{f"d.{e}": h for e, h in observer.down.items()}}
            distributed.all_reduce_sums(ranks, sums, device)
            linear_hessians.update(observer.linear)
            if block is not None:
                tensors.update(_quantize_experts(store, block, kept, observer, prefix, scheme, fmt, source_dtype, modules))
            del observer, sums
            release_host_memory()  # the chunk's freed buffers back to the OS, not left between the kept outputs
        for name, m in linears.items():  # last: each chunk above saw the layer's inputs as they came
            tensors.update(_quantize(store, f"{prefix}{name}", m.weight, linear_hessians.pop(name, None), scheme, fmt, source_dtype))
        store.put(layer, tensors)
        return True

    calibration.forward_by_layer(batches, visit)
    return store


def _expert_dims(block) -> tuple[int, int]:
    """(routed experts, hidden size) of a MoE block, (0, 0) for a dense layer."""
    if block is None:
        return 0, 0
    e, _, h = block.experts.gate_up_proj.shape
    return e, h


def _run(v, observer: _Hessians, block) -> None:
    """Every batch of the visit through the layer with `observer` on (outputs recomputed later)."""
    if block is not None:
        v.run(observer)
        return
    for b in range(v.batches):
        observer.begin_batch(v.masks[b])
        v.recompute(b)


def _quantize(store: LayerUpdates, name: str, weight: torch.Tensor, hessian, scheme, fmt, source_dtype) -> dict[str, torch.Tensor]:
    """GPTQ of one weight: its compressed tensors under `name`, and the weight set to what they stand
    for. The scales come from the weight in the checkpoint's dtype, as `quantize` computes them."""
    q, scale, zero = gptq_weight(weight.detach().to(source_dtype), hessian, scheme)
    store.summary["weights"] += 1
    store.summary["rounded_to_nearest"] += hessian is None or not bool((hessian.diagonal() > 0).any())
    with torch.no_grad():
        weight.copy_(q.to(weight.dtype))
    return {f"{name}.{k}": t for k, t in pack_weight(q, scale, zero, scheme, fmt).items()}


def _quantize_experts(store, block, kept, observer: _Hessians, prefix: str, scheme, fmt, source_dtype, modules) -> dict[str, torch.Tensor]:
    experts = block.experts
    width = experts.gate_up_proj.shape[1] // 2
    out = {}
    for e in observer.experts:
        if len(kept[e] if kept is not None else range(width)) == 0:
            observer.gate_up.pop(e, None)
            observer.down.pop(e, None)
            continue
        k = (kept[e] if kept is not None else torch.arange(width)).to(experts.down_proj.device)
        base = f"{prefix}mlp.experts.{e}."
        gate = experts.gate_up_proj[e, :width].index_select(0, k).clone()
        up = experts.gate_up_proj[e, width:].index_select(0, k).clone()
        down = experts.down_proj[e].index_select(1, k).clone()
        h = observer.gate_up.pop(e)  # dropped once this expert is done: the chunk's peak, not the layer's
        for proj, w, hess in (("gate_proj", gate, h), ("up_proj", up, h), ("down_proj", down, observer.down.pop(e, None))):
            if f"{base}{proj}" not in modules:
                continue
            out.update(_quantize(store, f"{base}{proj}", w, hess, scheme, fmt, source_dtype))
        with torch.no_grad():
            experts.gate_up_proj[e, :width].index_copy_(0, k, gate)
            experts.gate_up_proj[e, width:].index_copy_(0, k, up)
            experts.down_proj[e].index_copy_(1, k, down)
    return out


def computed_tensors(store: LayerUpdates, family: Family):
    """For `quantize_folder(computed=...)`: a weight's compressed tensors by its on-disk name, or None.
    Each layer's file is opened and its names indexed once (the writer asks weight by weight, in order)."""
    from safetensors import safe_open

    opened: dict[int, tuple] = {}  # layer -> (open file, module -> its keys); only the current layer stays open

    def get(disk_name: str) -> dict[str, torch.Tensor] | None:
        module = family.module_tensor_name(disk_name)[: -len(".weight")]
        m = re.match(r"model\.layers\.(\d+)\.", module)
        if m is None:
            return None
        layer = int(m[1])
        if layer not in opened:
            opened.clear()
            if not store.file(layer).is_file():
                opened[layer] = (None, {})
            else:
                f = safe_open(store.file(layer), "pt")
                index: dict[str, list[str]] = {}
                for key in f.keys():
                    index.setdefault(key.rsplit(".", 1)[0], []).append(key)
                opened[layer] = (f, index)
        f, index = opened[layer]
        parts = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in index.get(module, [])}
        return parts or None

    return get
