"""Resumable calibration: the running sums are saved every K batches, so a killed run continues.

The state lives in a hidden folder beside the output (`.OUT.heapr-partial/`, one file per rank) and is
written atomically (temporary file, then rename), so a kill at any moment leaves the last complete
checkpoint. A resumed run loads the sums and the number of batches done and continues with the next
batch: the additions happen in the same order, so its statistics equal an uninterrupted run's exactly.
The folder is removed once the pruned checkpoint is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from heapr_serve.errors import HeaprError


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.heapr-partial"


class CalibrationState:
    """The checkpoint of one rank's calibration; `identity` says which run it belongs to."""

    def __init__(self, out: Path, rank: int, world: int, identity: dict):
        self.folder = partial_folder(out)
        self.file = self.folder / f"calibration-rank{rank}-of-{world}.safetensors"
        self.identity = identity

    def exists(self) -> bool:
        return self.folder.is_dir() and any(self.folder.glob("calibration-rank*.safetensors"))

    def load(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(batches done, sums); refuses a checkpoint of another run."""
        if not self.file.is_file():
            others = sorted(p.name for p in self.folder.glob("calibration-rank*.safetensors"))
            raise HeaprError(f"--resume: {self.folder} holds {others or 'no checkpoint'}, not {self.file.name}; resume with the same number of ranks, or drop --resume")
        try:
            with safe_open(self.file, "pt") as f:
                meta = json.loads((f.metadata() or {}).get("heapr_calibration_state", "{}"))
                sums = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise HeaprError(f"--resume: {self.file} is not a readable calibration checkpoint ({err}); drop --resume to start again") from None
        theirs = meta.get("identity", {})
        changed = sorted(k for k in set(theirs) | set(self.identity) if theirs.get(k) != self.identity.get(k))
        if changed:
            raise HeaprError(f"--resume: the checkpoint in {self.folder} is of another run ({', '.join(changed)} differ); use the same flags, or drop --resume and pass --overwrite to start again")
        return int(meta["done"]), sums

    def save(self, done: int, sums: dict[str, torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(f".tmp-{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in sums.items()}, str(tmp),
                  metadata={"heapr_calibration_state": json.dumps({"done": done, "identity": self.identity})})
        os.replace(tmp, self.file)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def calibrate_in_chunks(calibration, batches: list, observer, loss_scale: float, every: int,
                        state: CalibrationState | None, done: int = 0, progress=None, save_final: bool = False) -> None:
    """Run `calibration` over batches[done:], `every` batches at a time, checkpointing after each chunk
    (after the last one too with `save_final`)."""
    every = max(1, every)
    for start in range(done, len(batches), every):
        chunk = batches[start : start + every]
        calibration.run(chunk, observer, loss_scale, progress)
        if state is not None and (save_final or start + len(chunk) < len(batches)):
            state.save(start + len(chunk), observer.sums())
