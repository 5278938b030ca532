"""How much memory a calibration run needs, estimated from config.json and the safetensors headers
before anything is loaded, and how much the machine has: so `compress` can stream by itself when the
model would not fit, and say so."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from heapr_serve.checkpoint.format import open_safetensors, safetensors_files
from heapr_serve.checkpoint.source import SCALE_SUFFIX

GIB = 1024**3


@dataclass(frozen=True)
class MemoryNeed:
    weights: int  # whole model in the calibration dtype
    largest_layer: int  # the biggest decoder layer (or embedding / head) in the calibration dtype
    in_memory_activations: int  # autograd graph of one batch through every layer, and its logits
    streamed_activations: int  # boundary states of every batch of a chunk + one layer's graph + a loss chunk

    @property
    def in_memory(self) -> int:
        return self.weights + self.in_memory_activations

    @property
    def streamed(self) -> int:
        return self.largest_layer + self.streamed_activations


def _module_of(name: str) -> str:
    m = re.match(r"^(.*?layers\.\d+)\.", name)
    return m[1] if m else name.rsplit(".", 1)[0]


def estimate(source, config: dict, dtype: torch.dtype, batch_size: int, seq_len: int, batches_per_chunk: int) -> MemoryNeed:
    """`source` is the model folder; sizes in bytes (estimates: activations by a per-token rule)."""
    bytes_per = torch.empty(0, dtype=dtype).element_size()
    per_module: dict[str, int] = {}
    for file in sorted(set(safetensors_files(source).values())):
        with open_safetensors(source / file) as f:
            for name in f.keys():
                if name.endswith(SCALE_SUFFIX):
                    continue
                numel = torch.Size(f.get_slice(name).get_shape()).numel()
                per_module[_module_of(name)] = per_module.get(_module_of(name), 0) + numel * bytes_per
    hidden = int(config.get("hidden_size", 0))
    layers = int(config.get("num_hidden_layers", 1))
    vocab = int(config.get("vocab_size", 0))
    top_k = int(config.get("num_experts_per_tok", 1))
    width = int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 0)
    tokens = batch_size * seq_len
    # per token and layer, what autograd keeps: norms, q/k/v/o, residuals (~16 H) and top-k expert
    # intermediates (gate, up, product: 3 x top_k x I); logits in float32 with their softmax and gradient
    graph_per_layer = tokens * (16 * hidden + 3 * top_k * width) * bytes_per
    logits = tokens * vocab * 4 * 3
    loss_chunk = 2048 * vocab * 4 * 3
    boundary = batches_per_chunk * tokens * hidden * bytes_per * (layers + 1)
    return MemoryNeed(sum(per_module.values()), max(per_module.values(), default=0), graph_per_layer * layers + logits,
                      boundary + graph_per_layer + min(logits, loss_chunk))


def available(device: torch.device) -> int:
    """Bytes free for this run: MemAvailable on the host, free memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def host_available() -> int:
    return available(torch.device("cpu"))
