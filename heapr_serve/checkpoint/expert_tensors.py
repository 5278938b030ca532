"""Which stored tensors hold a family's routed experts, and how a fused stack divides into them.

A checkpoint stores routed experts per expert (2-D `...experts.7.gate_proj.weight`, under the
family's on-disk block and projection names: gate and up [I, H], down [H, I]) or fused
(`...experts.gate_up_proj` [E, 2I, H] with the gate rows first, `...experts.down_proj` [E, H, I];
gpt-oss: [E, H, 2I] with gate and up columns interleaved, and [E, I, H]). The writer, the baselines'
weight norms, the output-size estimate and the streamed loader all ask the same questions, answered
here once: which expert's part is this tensor, and what are a stack's gate, up and down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heapr_serve.checkpoint.format import FUSED_EXPERTS_TENSOR, PER_EXPERT_TENSOR
from heapr_serve.families import PROJ_KINDS, Family


@dataclass(frozen=True)
class ExpertTensor:
    """One stored routed-expert tensor: one expert's gate, up or down (`expert` set), or the fused
    gate_up or down stack of every expert of the layer (`expert` None)."""

    prefix: str  # the decoder layers' prefix, `model.layers.`
    layer: int
    part: str  # gate, up or down; gate_up or down for a stack
    expert: int | None = None


def expert_tensor(family: Family, name: str) -> ExpertTensor | None:
    """`name` as one of `family`'s routed-expert tensors, or None (shared experts, routers, anything
    else, and Qwen3-Next / Qwen3.5's separate MTP module, which is kept whole)."""
    m = PER_EXPERT_TENSOR.match(name)
    if m:
        if m["block"] != family.disk_block or m["proj"] not in family.disk_projs:
            return None
        return ExpertTensor(m["prefix"], int(m["layer"]), PROJ_KINDS[family.disk_projs.index(m["proj"])], int(m["expert"]))
    m = FUSED_EXPERTS_TENSOR.match(name)
    if m:
        return ExpertTensor(m["prefix"], int(m["layer"]), m["proj"].removesuffix("_proj"))
    return None


def gate_and_up(family: Family, stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the gate and up parts of a fused gate_up stack (or of one expert's slice of it): the
    two halves of its rows [.., 2I, H], gate first; gpt-oss's even and odd columns of [.., H, 2I]."""
    if family.expert_layout == "gpt_oss":
        return stack[..., 0::2], stack[..., 1::2]
    half = stack.shape[-2] // 2
    return stack[..., :half, :], stack[..., half:, :]


def expert_parts(family: Family, tensor: ExpertTensor, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gate, up and down parts `value` holds, as views in one orientation whatever the layout:
    gate and up [.., I, H] (a neuron is a row), down [.., H, I] (a neuron is a column); [E, ..] for
    a stack."""
    gpt_oss = tensor.expert is None and family.expert_layout == "gpt_oss"
    if tensor.part == "gate_up":
        gate, up = gate_and_up(family, value)
        return {"gate": gate.transpose(-1, -2), "up": up.transpose(-1, -2)} if gpt_oss else {"gate": gate, "up": up}
    return {tensor.part: value.transpose(-1, -2) if gpt_oss else value}
