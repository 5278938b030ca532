"""New values for a pruned layer's kept weights, one safetensors file per layer, read by the writer.

`--reconstruct` re-fits down projections and `--heal` tunes gate, up, down and the router; both run
layer by layer long before the checkpoint is written, and a big model's new values would not fit in
memory, so each layer's go to a file as soon as they exist. Keys: `"{expert}.{proj}"` with proj
gate [K, H], up [K, H] or down [H, K] at the expert's kept width K, and `"router"` [E, H]. A file's
metadata may say which run it belongs to, so an interrupted `--heal` resumes only its own layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from heapr_serve.families import Family


@dataclass
class LayerUpdates:
    folder: Path
    summary: dict = field(default_factory=dict)
    identity: dict | None = None  # the run these values belong to (written into each file)

    def file(self, layer: int) -> Path:
        return self.folder / f"layer-{layer}.safetensors"

    def put(self, layer: int, tensors: dict[str, torch.Tensor], identity: dict | None = None) -> None:
        """Written atomically (temporary name, then rename): a kill leaves the layer absent, never torn."""
        if not tensors:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.file(layer).with_suffix(f".tmp-{os.getpid()}")
        metadata = {"heapr_identity": json.dumps(identity, sort_keys=True)} if identity is not None else None
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, self.file(layer))

    def get(self, layer: int, key: str) -> torch.Tensor | None:
        file = self.file(layer)
        if not file.is_file():
            return None
        with safe_open(file, "pt") as f:
            return f.get_tensor(key) if key in f.keys() else None

    def load(self, layer: int, identity: dict) -> dict[str, torch.Tensor] | None:
        """A layer's tensors if this folder holds them for the run `identity` describes, else None."""
        file = self.file(layer)
        if not file.is_file():
            return None
        try:
            with safe_open(file, "pt") as f:
                if json.loads((f.metadata() or {}).get("heapr_identity", "null")) != json.loads(json.dumps(identity, sort_keys=True)):
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError):
            return None


def apply_kept_values(block, family: Family, kept, tensors: dict[str, torch.Tensor]) -> None:
    """A layer's new values into its resident dense block (--heal's resume, --heal-e2e's start, the GPTQ
    pass): pruned neurons zero, kept ones from `tensors` (this module's keys) where it has them, else
    the block's own."""
    experts = block.experts
    width = experts.gate_up_proj.shape[1] // 2
    with torch.no_grad():
        for e, k in enumerate(kept):
            k = k.to(experts.down_proj.device)
            parts = [experts.gate_up_proj[e, :width].index_select(0, k), experts.gate_up_proj[e, width:].index_select(0, k),
                     experts.down_proj[e].index_select(1, k)]
            parts = [tensors[f"{e}.{name}"].to(old.dtype) if f"{e}.{name}" in tensors else old
                     for name, old in zip(("gate", "up", "down"), parts)]
            experts.gate_up_proj[e].zero_()
            experts.down_proj[e].zero_()
            if len(k):
                experts.gate_up_proj[e, :width].index_copy_(0, k, parts[0])
                experts.gate_up_proj[e, width:].index_copy_(0, k, parts[1])
                experts.down_proj[e].index_copy_(1, k, parts[2])
        if "router" in tensors:
            weight = getattr(block, family.router).weight
            weight.copy_(tensors["router"].to(weight.dtype))
