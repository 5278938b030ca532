"""Data-parallel calibration over torch.distributed (design §6).

The statistics are sums, so ranks calibrate disjoint shares of the batches and one all-reduce of
every running sum at the end gives the single-process result, up to the order of float32 additions.
Launch with torchrun (`torchrun --nproc-per-node N -m heapr_serve compress ...`, several nodes through
torchrun's own rendezvous): gloo on CPU, NCCL on GPUs (one per local rank). Rank 0 plans and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from heapr_serve.errors import HeaprError

STARTED = False  # set once the process group is up: errors after that are this rank's own


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's disjoint share (round robin, so shares differ by at most one)."""
        return items[self.rank :: self.world]


def ranks_from_env() -> Ranks:
    """The ranks torchrun describes in the environment; one process when it is not there."""
    try:
        return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise HeaprError("RANK / WORLD_SIZE / LOCAL_RANK are not integers; launch data-parallel runs with torchrun") from None


def is_quiet_rank() -> bool:
    """Another rank than 0 of a launch, before calibration started: rank 0 says what is wrong."""
    ranks = ranks_from_env()
    return ranks.world > 1 and not ranks.is_main and not STARTED


def device_for(ranks: Ranks, device: torch.device) -> torch.device:
    """One GPU per local rank when the run is on CUDA."""
    if ranks.world > 1 and device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise HeaprError(f"local rank {ranks.local_rank} has no GPU ({torch.cuda.device_count()} visible); use --nproc-per-node <= the GPUs per node")
        return torch.device("cuda", ranks.local_rank)
    return device


def start(ranks: Ranks, device: torch.device) -> None:
    global STARTED
    if ranks.world == 1:
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    STARTED = True


def all_reduce_sums(ranks: Ranks, sums: dict[str, torch.Tensor], device: torch.device) -> None:
    """Sum every running sum over the ranks, in place (one collective per tensor, in name order)."""
    if ranks.world == 1:
        return
    import torch.distributed as dist

    for name in sorted(sums):
        tensor = sums[name]
        moved = tensor.to(device) if device.type == "cuda" else tensor
        dist.all_reduce(moved)
        if moved is not tensor:
            tensor.copy_(moved)


def all_reduce_flat(ranks: Ranks, tensors: list[torch.Tensor], device: torch.device) -> None:
    """Sum same-dtype tensors over the ranks, in place, with ONE collective: healing reduces every
    kept weight's gradient every step, and one gloo call per tensor (~1 ms each, 49 per step on the
    bundled model) cost more than the step itself."""
    if ranks.world == 1 or not tensors:
        return
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def finish(ranks: Ranks) -> None:
    global STARTED
    if ranks.world == 1 or not STARTED:
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    STARTED = False
