"""How much memory a calibration run needs, estimated from config.json and the safetensors headers
before anything is loaded, and how much the machine has: so `compress` streams by itself when the
model would not fit in memory, and refuses in a second, with the estimate and the flags that would
fit, when neither way fits, instead of running until the kernel kills it. Also the context-length
check: a window longer than the model's declared positions cannot be calibrated."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

import torch

from heapr_serve.checkpoint.format import MXFP4_TENSOR, open_safetensors, safetensors_files
from heapr_serve.checkpoint.source import SCALE_SUFFIX
from heapr_serve.errors import HeaprError

GIB = 1024**3


@dataclass(frozen=True)
class MemoryNeed:
    weights: int  # whole model in the calibration dtype
    largest_layer: int  # the biggest decoder layer (or embedding / head) in the calibration dtype
    in_memory_activations: int  # autograd graph of one batch through every layer, and its logits
    streamed_activations: int  # boundary states of every batch of a chunk + one layer's graph + a loss chunk
    boundary: int = 0  # of which the boundary states (host memory, or files under --activations-dir)
    statistics: int = 0  # the float32 sums of squares (and their all-reduce copy)

    @property
    def in_memory(self) -> int:
        return self.weights + self.in_memory_activations + self.statistics

    @property
    def streamed(self) -> int:
        return self.largest_layer + self.streamed_activations + self.statistics

    @property
    def streamed_on_disk(self) -> int:
        """Streamed with --activations-dir: the boundary states are files, not memory."""
        return self.streamed - self.boundary


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _module_of(name: str) -> str:
    m = re.match(r"^(.*?layers\.\d+)\.", name)
    return m[1] if m else name.rsplit(".", 1)[0]


def _module_bytes(source, bytes_per: int) -> dict[str, int]:
    per_module: dict[str, int] = {}
    for file in sorted(set(safetensors_files(source).values())):
        with open_safetensors(source / file) as f:
            for name in f.keys():
                mxfp4 = MXFP4_TENSOR.match(name)
                if name.endswith(SCALE_SUFFIX) or (mxfp4 and mxfp4["part"] == "scales"):
                    continue
                # MXFP4 blocks hold two values a byte; they are dequantised to the calibration dtype
                numel = torch.Size(f.get_slice(name).get_shape()).numel() * (2 if mxfp4 else 1)
                per_module[_module_of(name)] = per_module.get(_module_of(name), 0) + numel * bytes_per
    return per_module


def estimate(source, config: dict, dtype: torch.dtype, batch_size: int, seq_len: int, batches_per_chunk: int,
             _modules: dict[str, int] | None = None) -> MemoryNeed:
    """`source` is the model folder; sizes in bytes (estimates: activations by a per-token rule)."""
    bytes_per = torch.empty(0, dtype=dtype).element_size()
    per_module = _modules if _modules is not None else _module_bytes(source, bytes_per)
    hidden = int(config.get("hidden_size", 0))
    layers = int(config.get("num_hidden_layers", 1))
    vocab = int(config.get("vocab_size", 0))
    top_k = int(config.get("num_experts_per_tok") or config.get("moe_k") or 1)
    width = int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 0)
    experts = int(config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
                  or config.get("moe_num_experts") or 1)
    tokens = batch_size * seq_len
    # per token and layer, what autograd keeps: norms, q/k/v/o, residuals (~16 H) and top-k expert
    # intermediates (gate, up, product: 3 x top_k x I); logits in float32 with their softmax and gradient
    graph_per_layer = tokens * (16 * hidden + 3 * top_k * width) * bytes_per
    logits = tokens * vocab * 4 * 3
    loss_chunk = 2048 * vocab * 4 * 3
    boundary = batches_per_chunk * tokens * hidden * bytes_per * (layers + 1)
    statistics = layers * experts * width * 4 * 2 * 2
    return MemoryNeed(sum(per_module.values()), max(per_module.values(), default=0), graph_per_layer * layers + logits,
                      boundary + graph_per_layer + min(logits, loss_chunk), boundary, statistics)


# Share of the free memory an estimate may fill when choosing by itself (the estimate is a rule of
# thumb); a mode forced with --streamed / --no-streamed is refused only past all of it.
AUTO_SHARE = 0.8

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_limit(config: dict) -> tuple[str, int] | None:
    """(config key, positions) the model declares, if any."""
    for source in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return key, value
    return None


def check_context(config: dict, seq_len: int, where: str, what: str | None = None, fix: str | None = None) -> None:
    """Refuse sequences longer than the model's declared positions (`where` names its config)."""
    limit = context_limit(config)
    if limit and seq_len > limit[1]:
        raise HeaprError(f"{what or f'--seq-len {seq_len}'}: longer than the {limit[1]} positions {where} declares ({limit[0]}); "
                         f"{fix or f'use --seq-len {limit[1]} or less'}")


@dataclass(frozen=True)
class Room:
    host: int  # bytes free on the host
    device: int  # bytes free on the calibration device (the host again on CPU)
    cuda: bool
    disk: int | None = None  # bytes free under --activations-dir, if given


def room_for(device: torch.device, activations_dir=None) -> Room:
    host = host_available()
    disk = None
    if activations_dir is not None:
        from heapr_serve.preflight import nearest_existing

        disk = shutil.disk_usage(nearest_existing(activations_dir)).free
    if device.type == "cuda":
        return Room(host, available(device), True, disk)
    return Room(host, host, False, disk)


def _fits_in_memory(need: MemoryNeed, room: Room, share: float) -> bool:
    return need.in_memory <= share * min(room.host, room.device)


def _fits_streamed(need: MemoryNeed, room: Room, share: float, on_disk: bool) -> bool:
    on_device = need.largest_layer + need.streamed_activations - need.boundary + need.statistics
    host_part = 0 if on_disk else need.boundary
    if on_disk and room.disk is not None and need.boundary > room.disk:
        return False
    if room.cuda:
        return on_device <= share * room.device and host_part + need.largest_layer <= share * room.host
    return on_device + host_part <= share * room.host


def decide(need: MemoryNeed, room: Room, streamed: bool | None, activations_dir, fix) -> tuple[bool, str]:
    """(streamed?, the reason in words), or a HeaprError with the estimate and `fix()`: the flags
    that would make it fit."""
    on_disk = activations_dir is not None
    free = min(room.host, room.device)
    if streamed is False:
        if not _fits_in_memory(need, room, 1.0):
            then = "" if _fits_streamed(need, room, AUTO_SHARE, on_disk) else fix().replace("; pass", " and pass", 1)
            raise HeaprError(f"--no-streamed: in memory the run needs ~{_size(need.in_memory)}, {_size(free)} are free; "
                             f"drop --no-streamed (streamed needs ~{_size(need.streamed)}){then}")
        return False, "in memory (--no-streamed)"
    if streamed is None and _fits_in_memory(need, room, AUTO_SHARE):
        return False, f"in memory (needs ~{_size(need.in_memory)} of {_size(free)} free)"
    share = 1.0 if streamed else AUTO_SHARE
    if not _fits_streamed(need, room, share, on_disk):
        if on_disk and room.disk is not None and need.boundary > room.disk:
            raise HeaprError(f"--activations-dir {activations_dir}: the saved layer inputs need ~{_size(need.boundary)} of disk, "
                             f"{_size(room.disk)} are free; free some space or use a smaller --checkpoint-every / --batch-size")
        streamed_need = need.streamed_on_disk if on_disk else need.streamed
        raise HeaprError(f"the calibration needs ~{_size(need.in_memory)} in memory and ~{_size(streamed_need)} streamed"
                         f"{' (saved inputs on disk)' if on_disk else ''}, but {_size(free)} are free{fix()}")
    if streamed:
        return True, "streamed layer by layer (--streamed)"
    return True, (f"streamed layer by layer: in memory it would need ~{_size(need.in_memory)}, "
                  f"{_size(free)} are free (pass --no-streamed to insist)")


def batches_per_chunk(nsamples: int, batch_size: int, checkpoint_every: int, world: int = 1) -> int:
    """How many batches one rank holds between two checkpoints (the streamed pass's boundary states)."""
    batches = -(-nsamples // batch_size)
    return max(1, min(checkpoint_every, -(-batches // max(1, world))))


def fitting_flags(source, config: dict, dtype: torch.dtype, batch_size: int, seq_len: int, nsamples: int,
                  checkpoint_every: int, world: int, room: Room, activations_dir) -> str:
    """'; pass ...' naming flag values under which the streamed run would fit, from the same estimate."""
    modules = _module_bytes(source, torch.empty(0, dtype=dtype).element_size())

    def fits(b: int, s: int, every: int, on_disk: bool) -> bool:
        need = estimate(source, config, dtype, b, s, batches_per_chunk(nsamples, b, every, world), modules)
        return _fits_streamed(need, room, AUTO_SHARE, on_disk)

    on_disk = activations_dir is not None
    options = []
    if not on_disk and fits(batch_size, seq_len, checkpoint_every, True):
        options.append("--activations-dir DIR (saved layer inputs on disk)")
    smaller = [b for b in range(batch_size - 1, 0, -1) if fits(b, seq_len, checkpoint_every, on_disk)]
    if smaller:
        options.append(f"--batch-size {smaller[0]}")
    if checkpoint_every > 1 and fits(batch_size, seq_len, 1, on_disk):
        options.append("--checkpoint-every 1")
    lengths = [s for s in (4096, 2048, 1024, 512, 256, 128, 64, 32) if s < seq_len and fits(batch_size, s, checkpoint_every, on_disk)]
    if lengths:
        options.append(f"--seq-len {lengths[0]}")
    if not options:
        return "; even one layer with one short batch does not fit: use a machine with more memory"
    return "; pass " + " or ".join(options)


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
