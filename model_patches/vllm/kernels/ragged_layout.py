"""The packed layout the ragged kernels read: one MoE layer's experts of different widths in two 2-D tensors.

``pack_ragged_experts`` packs per-expert (gate [I_e,H], up [I_e,H], down [H,I_e]) tensors at load time,
with per-expert row offsets; the layout is described on ``PackedRaggedExperts``. A width-0 expert takes
no rows. Pure torch: it imports and runs without Triton or a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class PackedRaggedExperts:
    """The routed experts of one MoE layer in the layout the kernels read.

    * ``w13`` [sum_e 2*I_e, H]: expert e occupies rows ``w13_offsets[e] : w13_offsets[e] + 2*I_e``,
      its I_e gate rows first, then its I_e up rows (the per-expert order of vLLM's w13). One expert's
      whole N-range is contiguous, every row is K(=H)-contiguous, so each gate or up tile a program
      loads is BLOCK_N full-stride rows: coalesced, and the up tile sits at a fixed distance (I_e rows)
      from the gate tile, so no second offset table is needed. Interleaving gate/up per tile would buy
      nothing: the kernel issues two tile loads either way.
    * ``w2t`` [sum_e I_e, H]: expert e's down projection *transposed*, rows ``w2_offsets[e] :
      w2_offsets[e] + I_e`` (row k = neuron k's output column d_k). The down GEMM's ragged dimension is
      its reduction dimension K; stored this way the stride is H for every expert (one shared stride
      instead of one per expert), the ragged tail is whole masked rows, and the B tile is N-contiguous,
      which Hopper's wgmma reads from shared memory as well as a K-major one.
    * ``widths`` int32 [E] (I_e, 0 allowed), ``w13_offsets`` / ``w2_offsets`` int64 [E] (row offsets:
      int64 because rows * H overflows int32 on DeepSeek-V3-sized layers).
    * ``max_width``: max_e I_e as a Python int; it sizes grids and the intermediate buffer, so it must
      be static (known at load time) for CUDA graphs.

    Tensor parallelism: split every expert's neurons across ranks and pack each rank's share; the layer
    all-reduces the outputs as for a dense MoE.
    """

    w13: torch.Tensor
    w2t: torch.Tensor
    widths: torch.Tensor
    w13_offsets: torch.Tensor
    w2_offsets: torch.Tensor
    max_width: int

    @property
    def num_experts(self) -> int:
        return self.widths.numel()

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[1]

    def op(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
           ) -> torch.Tensor:
        """Call ``torch.ops.heapr.ragged_fused_moe`` (registered by importing
        model_patches.vllm.kernels.ragged_moe_triton) on this layer: the whole per-forward boundary."""
        return torch.ops.heapr.ragged_fused_moe(hidden, self.w13, self.w2t, self.widths,
                                                self.w13_offsets, self.w2_offsets, topk_ids,
                                                topk_weights, self.max_width)

    def to(self, device=None, dtype=None) -> PackedRaggedExperts:
        """Move (and optionally cast the weights of) the packed layer; index tensors keep their dtype."""
        return PackedRaggedExperts(
            w13=self.w13.to(device=device, dtype=dtype),
            w2t=self.w2t.to(device=device, dtype=dtype),
            widths=self.widths.to(device=device),
            w13_offsets=self.w13_offsets.to(device=device),
            w2_offsets=self.w2_offsets.to(device=device),
            max_width=self.max_width,
        )


def ragged_offsets(widths: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row offsets (w13_offsets, w2_offsets), int64 [E], of each expert in the packed tensors."""
    w = torch.as_tensor(widths, dtype=torch.int64).reshape(-1).cpu()
    if (w < 0).any():
        raise ValueError(f"expert widths must be >= 0, got {w.tolist()}")
    w2_off = torch.cumsum(w, 0) - w
    return 2 * w2_off, w2_off


def pack_ragged_experts(
    experts: Sequence[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None],
    hidden_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PackedRaggedExperts:
    """Pack per-expert (gate [I_e,H], up [I_e,H], down [H,I_e]) into the kernels' layout (load time).

    A width-0 expert is given as ``None``, ``(None, None, None)`` or tensors with I_e = 0; it takes no
    rows. Shapes are checked so that a wrong checkpoint fails here, with the expert named, rather
    than as wrong numbers later. ``hidden_size`` is required only if every expert has width 0.
    """
    widths: list[int] = []
    gate_up_parts: list[torch.Tensor] = []
    down_parts: list[torch.Tensor] = []
    H = hidden_size
    for e, triple in enumerate(experts):
        if triple is None or all(t is None for t in triple):
            widths.append(0)
            continue
        if any(t is None for t in triple):
            raise ValueError(f"expert {e}: gate, up and down must all be given or all be None")
        gate, up, down = triple
        if gate.dim() != 2 or up.dim() != 2 or down.dim() != 2:
            raise ValueError(f"expert {e}: gate, up, down must be 2-D, got {tuple(gate.shape)}, "
                             f"{tuple(up.shape)}, {tuple(down.shape)}")
        i_e, h = gate.shape
        if H is None:
            H = h
        if (tuple(gate.shape) != (i_e, H) or tuple(up.shape) != (i_e, H)
                or tuple(down.shape) != (H, i_e)):
            raise ValueError(
                f"expert {e}: expected gate [I_e,{H}], up [I_e,{H}], down [{H},I_e] with one I_e, got "
                f"gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}")
        widths.append(i_e)
        if i_e:
            dt = dtype or gate.dtype
            gate_up_parts += [gate.to(device=device, dtype=dt), up.to(device=device, dtype=dt)]
            down_parts.append(down.to(device=device, dtype=dt).t())
    if H is None:
        raise ValueError("every expert has width 0: pass hidden_size")
    if not widths:
        raise ValueError("no experts given")
    if dtype is None:
        dtype = gate_up_parts[0].dtype if gate_up_parts else torch.bfloat16
    if gate_up_parts:
        w13 = torch.cat(gate_up_parts, 0).contiguous()
        w2t = torch.cat(down_parts, 0).contiguous()
    else:
        w13 = torch.empty((0, H), dtype=dtype, device=device)
        w2t = torch.empty((0, H), dtype=dtype, device=device)
    w13_off, w2_off = ragged_offsets(widths)
    return PackedRaggedExperts(
        w13=w13,
        w2t=w2t,
        widths=torch.tensor(widths, dtype=torch.int32, device=w13.device),
        w13_offsets=w13_off.to(w13.device),
        w2_offsets=w2_off.to(w13.device),
        max_width=max(widths),
    )
