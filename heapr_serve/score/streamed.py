"""The streamed calibration pass: exact HEAPr statistics with one decoder layer resident at a time.

The statistics need a (forward) and dL/da (backward) of the *whole* model's loss, so a layer-by-layer
observer without a backward is not enough. Exact and small, by recomputation at layer granularity
(design §6), layer-major over the batches so each layer is read from disk twice per pass:

    forward:  h_0 = embed(x); for l = 0..L-1: load layer l, save h_l, h_{l+1} = layer_l(h_l), unload
    loss:     L = CE(lm_head(norm(h_L)), x[1:]) / constant, in chunks of tokens; g_L = dL/dh_L
    backward: for l = L-1..0: load layer l, recompute h_{l+1} = layer_l(h_l) with autograd on h_l,
              backprop g_{l+1} -> g_l (the observer records a and dL/da here, once), unload

Memory: one layer's weights + the saved boundary states (host memory, or files in `activations_dir`)
+ one layer's autograd graph for one batch. The layers' own code runs unchanged: the decoder layer
arguments (causal mask, rotary position embeddings) are captured from the stock model's forward.
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from heapr_serve.checkpoint.source import SourceCheckpoint, build_meta_model
from heapr_serve.score.moe_forward import use_sorted_forward


class _Captured(Exception):
    def __init__(self, kwargs):
        self.kwargs = kwargs


class _CaptureLayer(nn.Module):
    """Stands in for each decoder layer once per batch: records the arguments the stock model passes
    to it (mask, position ids and embeddings; they differ by layer type: gpt-oss's sliding-window and
    full-attention masks, Qwen3-Next's linear-attention mask) and hands the hidden states on; the last
    one stops the forward with all of them."""

    def __init__(self, layer: nn.Module, seen: list[dict], last: bool):
        super().__init__()
        # the plain attributes the model's forward reads from its layers (Qwen3-Next: `layer_type`)
        for name, value in vars(layer).items():
            if not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                setattr(self, name, value)
        self._seen, self._last = seen, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to be called with keyword arguments after the hidden states")
        self._seen.append(kwargs)
        if self._last:
            raise _Captured(list(self._seen))
        return hidden_states


class ActivationStore:
    """Boundary hidden states h_l of every batch: host memory, or one file each under `folder`."""

    def __init__(self, folder: Path | None = None):
        self.folder = None
        self.memory: dict[tuple[int, int], torch.Tensor] = {}
        self.created = None  # the --activations-dir itself, when this run made it (removed again)
        if folder is not None:
            if not Path(folder).exists():
                self.created = Path(folder)
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="heapr-activations-", dir=folder))

    def put(self, layer: int, batch: int, h: torch.Tensor) -> None:
        h = h.detach().to("cpu")
        if self.folder is None:
            self.memory[(layer, batch)] = h
        else:
            torch.save(h, self.folder / f"h{layer}_{batch}.pt")

    def get(self, layer: int, batch: int, device) -> torch.Tensor:
        if self.folder is None:
            return self.memory[(layer, batch)].to(device)
        return torch.load(self.folder / f"h{layer}_{batch}.pt", weights_only=True).to(device)

    def drop(self, layer: int, batch: int) -> None:
        if self.folder is None:
            self.memory.pop((layer, batch), None)
        else:
            (self.folder / f"h{layer}_{batch}.pt").unlink(missing_ok=True)

    def close(self) -> None:
        self.memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.created is not None:
            try:
                self.created.rmdir()
            except OSError:
                pass


def _unload(module: nn.Module) -> None:
    """Back to the meta device; freed host memory is handed back to the OS at once (glibc keeps freed
    blocks below its mmap threshold otherwise, and the next layer would come on top of them)."""
    module.to("meta")
    release_host_memory()


def release_host_memory() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _rows(value, r: slice, rows: int):
    """The decoder-layer arguments of rows `r` of a batch of `rows` sequences (per-sequence tensors,
    such as the 4-D causal mask, are sliced; shared ones, such as position ids [1, T], are not)."""
    if isinstance(value, torch.Tensor):
        return value[r] if rows > 1 and value.dim() >= 1 and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, r, rows) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, r, rows) for k, v in value.items()}
    return value


class LayerVisit:
    """One decoder layer during `StreamedPass.forward_by_layer`: its batches' inputs and outputs."""

    def __init__(self, layer, module, store, layer_kwargs, masks, device):
        self.layer, self.module, self.store, self.kwargs, self.masks, self.device = layer, module, store, layer_kwargs, masks, device
        self.batches = len(masks)
        self.ran = False

    def recompute(self, b: int) -> torch.Tensor:
        return self.module(self.store.get(self.layer, b, self.device), **self.kwargs[b][self.layer])

    def run(self, observer) -> None:
        """Every batch through the layer with `observer` attached to its MoE block; outputs stored."""
        moe = {self.layer: self.module.mlp} if getattr(self.module.mlp, "experts", None) is not None else {}
        observer.attach(moe)
        try:
            for b in range(self.batches):
                observer.begin_batch(self.masks[b])
                self.store.put(self.layer + 1, b, self.recompute(b))
        finally:
            observer.detach()
        self.ran = True

    def output(self, b: int) -> torch.Tensor:
        return self.store.get(self.layer + 1, b, self.device)

    def set_output(self, b: int, h: torch.Tensor) -> None:
        self.store.put(self.layer + 1, b, h)


class StreamedPass:
    """Calibration over a model read from `source` one module at a time (CPU or CUDA `device`)."""

    def __init__(self, source: Path, dtype: torch.dtype, device: torch.device, activations_dir: Path | None = None,
                 loss_chunk_tokens: int = 2048, on_step: Callable[[str], None] | None = None,
                 recompute_tokens: int = 256):
        self.source = SourceCheckpoint(source)
        self.dtype, self.device = dtype, torch.device(device)
        self.activations_dir = activations_dir
        self.loss_chunk_tokens = loss_chunk_tokens
        self.recompute_tokens = recompute_tokens
        self.on_step = on_step  # called once per layer visit (2 L + 1 per run), for progress

    def steps_per_run(self) -> int:
        return 2 * self.source.num_layers + 1

    def _step(self, what: str) -> None:
        if self.on_step is not None:
            self.on_step(what)

    def _load_layer(self, model, layer: int) -> nn.Module:
        module = model.model.layers[layer]
        self.source.load_module(module, f"model.layers.{layer}.", self.device)
        for p in module.parameters():
            p.requires_grad_(False)
        use_sorted_forward(module)
        return module

    def _inputs(self, model, batches, store: ActivationStore) -> tuple[list[dict], list[torch.Tensor]]:
        """h_0 of every batch into `store`; the decoder-layer arguments and attention mask of each."""
        inner = model.model
        self.source.load_module(inner.embed_tokens, "model.embed_tokens.", self.device)
        rotary = inner.rotary_emb
        inner.rotary_emb = type(rotary)(config=rotary.config).to(self.device)
        layers = inner.layers
        layer_kwargs, masks = [], []  # per batch, per layer: the layer's keyword arguments
        with torch.no_grad():
            for b, (input_ids, attention_mask, _) in enumerate(batches):
                seen: list[dict] = []
                inner.layers = nn.ModuleList([_CaptureLayer(layer, seen, i == len(layers) - 1) for i, layer in enumerate(layers)])
                input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
                h0 = inner.embed_tokens(input_ids)
                try:
                    inner(inputs_embeds=h0, attention_mask=attention_mask, use_cache=False)
                    raise RuntimeError("the model's forward never reached its decoder layers")
                except _Captured as captured:
                    layer_kwargs.append(captured.kwargs)
                masks.append(attention_mask)
                store.put(0, b, h0)
        inner.layers = layers
        _unload(inner.embed_tokens)
        return layer_kwargs, masks

    def forward_by_layer(self, batches, visit: Callable[[int, nn.Module, "LayerVisit"], bool]) -> None:
        """Forward only, one decoder layer resident, over every batch (no loss, no backward). For each
        layer, `visit(layer, module, v)` may run the layer's inputs through it with an observer
        (`v.run`), change the module's weights and correct the stored outputs (`v.output`,
        `v.set_output`, `v.recompute`); it returns True to have every output recomputed from the
        module as it left it. The next layer's inputs are this layer's outputs: what the sequential
        re-fit of `--reconstruct` needs."""
        batches = list(batches)
        model = build_meta_model(self.source.path, self.dtype)
        store = ActivationStore(self.activations_dir)
        try:
            layer_kwargs, masks = self._inputs(model, batches, store)
            with torch.no_grad():
                for layer in range(self.source.num_layers):
                    module = self._load_layer(model, layer)
                    v = LayerVisit(layer, module, store, layer_kwargs, masks, self.device)
                    if visit(layer, module, v) or not v.ran:
                        for b in range(len(batches)):
                            store.put(layer + 1, b, v.recompute(b))
                    for b in range(len(batches)):
                        store.drop(layer, b)
                    _unload(module)
                    self._step(f"forward layer {layer}")
        finally:
            store.close()

    def run(self, batches, observer, loss_scale, progress=None) -> None:
        batches = list(batches)
        model = build_meta_model(self.source.path, self.dtype)
        inner = model.model
        num_layers = self.source.num_layers
        store = ActivationStore(self.activations_dir)
        try:
            # embeddings, and the decoder-layer arguments of every batch from the stock forward
            layer_kwargs, masks = self._inputs(model, batches, store)

            # forward, layer-major: save every layer's input
            with torch.no_grad():
                for layer in range(num_layers):
                    module = self._load_layer(model, layer)
                    for b in range(len(batches)):
                        store.put(layer + 1, b, module(store.get(layer, b, self.device), **layer_kwargs[b][layer]))
                    _unload(module)
                    self._step(f"forward layer {layer}")

            # the loss at the top, in chunks of tokens; gradient at h_L
            self.source.load_module(inner.norm, "model.norm.", self.device)
            self.source.load_module(model.lm_head, "lm_head.", self.device)
            for p in [*inner.norm.parameters(), *model.lm_head.parameters()]:
                p.requires_grad_(False)
            grads = []
            for b, (_, _, labels) in enumerate(batches):
                h = store.get(num_layers, b, self.device).requires_grad_(True)
                store.drop(num_layers, b)
                self._loss_backward(model, h, labels.to(self.device), loss_scale)
                grads.append(h.grad.to("cpu") if self.device.type == "cuda" else h.grad)
            _unload(inner.norm)
            _unload(model.lm_head)
            self._step("loss")

            # backward, layer-major: recompute each layer with autograd, observe, pass the gradient down
            for layer in reversed(range(num_layers)):
                module = self._load_layer(model, layer)
                moe = {layer: module.mlp} if getattr(module.mlp, "experts", None) is not None else {}
                observer.attach(moe)
                try:
                    for b in range(len(batches)):
                        grads[b] = self._recompute(module, store.get(layer, b, self.device), layer_kwargs[b][layer], masks[b],
                                                   grads[b], observer)
                        store.drop(layer, b)
                finally:
                    observer.detach()
                _unload(module)
                self._step(f"backward layer {layer}")
            if progress is not None:
                for mask in masks:
                    progress(int(mask.sum()))
        finally:
            store.close()

    def _recompute(self, module, h, kwargs, mask, grad, observer) -> torch.Tensor:
        """Recompute one batch through `module` with autograd, a few sequences at a time (the graph of
        `recompute_tokens` tokens, not of the batch, is alive at once: rows are independent), back-
        propagate `grad`; returns the gradient at the module's input."""
        rows = h.shape[0]
        step = max(1, self.recompute_tokens // h.shape[1])
        out_grad = torch.empty_like(h, device=grad.device)
        for start in range(0, rows, step):
            r = slice(start, start + step)
            part = h[r].detach().requires_grad_(True)
            observer.begin_batch(mask[r])
            module(part, **_rows(kwargs, r, rows)).backward(grad[r].to(self.device))
            out_grad[r] = part.grad.to(out_grad.device)
        return out_grad

    def _loss_backward(self, model, h: torch.Tensor, labels: torch.Tensor, loss_scale: float) -> None:
        """The calibration loss (next_token_loss) over chunks of `loss_chunk_tokens` positions, never
        the whole batch's float32 logits at once; each chunk's backward adds its share to h.grad, so
        the gradient is the full loss's."""
        x = h[:, :-1].reshape(-1, h.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        for start in range(0, x.shape[0], self.loss_chunk_tokens):
            rows = slice(start, start + self.loss_chunk_tokens)
            logits = model.lm_head(model.model.norm(x[rows])).float()
            loss = torch.nn.functional.cross_entropy(logits, targets[rows], ignore_index=-100, reduction="sum")
            (loss / loss_scale).backward(retain_graph=start + self.loss_chunk_tokens < x.shape[0])
