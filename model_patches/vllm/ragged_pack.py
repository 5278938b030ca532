"""The exact-width packed layout of the ragged CPU kernel (csrc/ragged_moe_avx512.cpp).

Each expert is stored at its own width, with no tile rounding: 2*n*H gate/up values and n*H down
values for width n (plus 32 zeros after the whole w13), all experts of a layer in one flat w13 and one flat w2 tensor with per-expert
offsets. The order inside an expert is the kernel's (VNNI pairs for bf16), documented in the C++
source; packing is plain tensor reshapes done once at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 16  # neurons per gate/up block of the kernel
DOWN_BLOCK = 64  # outputs per down block
TAIL = 32  # zeros after the last expert's w13: the AMX tile loads of a narrow block stay in bounds


@dataclass
class PackedExperts:
    w13: torch.Tensor  # flat, weight dtype
    w2: torch.Tensor  # flat, weight dtype
    widths: torch.Tensor  # int32 [E]
    w13_off: torch.Tensor  # int64 [E]
    w2_off: torch.Tensor  # int64 [E]
    max_width: int


def _pack_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[n, H] gate and up -> the kernel's blocks: per block of 16 neurons, per k-step, bw gate then bw up."""
    n, H = gate.shape
    pair = 2 if gate.dtype == torch.bfloat16 else 1
    parts = []
    for j0 in range(0, n, BLOCK):
        g, u = gate[j0:j0 + BLOCK], up[j0:j0 + BLOCK]
        bw = g.shape[0]
        # [bw, H] -> [H/pair, bw, pair]: k-step major, neuron, the pair of k's (VNNI for bf16)
        g = g.reshape(bw, H // pair, pair).permute(1, 0, 2)
        u = u.reshape(bw, H // pair, pair).permute(1, 0, 2)
        parts.append(torch.cat([g, u], dim=1).reshape(-1))
    return torch.cat(parts) if parts else gate.new_empty(0)


def _pack_down(down: torch.Tensor) -> torch.Tensor:
    """[H, n] down -> blocks of 64 outputs; in each, bf16: per neuron pair the (w[h][i], w[h][i+1])
    pairs, then an odd last neuron's values; fp32: per neuron its values."""
    H, n = down.shape
    parts = []
    for h0 in range(0, H, DOWN_BLOCK):
        d = down[h0:h0 + DOWN_BLOCK]
        hw = d.shape[0]
        if down.dtype != torch.bfloat16:
            parts.append(d.t().reshape(-1))
            continue
        even = n // 2 * 2
        parts.append(d[:, :even].reshape(hw, n // 2, 2).permute(1, 0, 2).reshape(-1))
        parts.append(d[:, even:].t().reshape(-1))
    return torch.cat(parts)


def pack_experts(experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None], hidden: int,
                 dtype: torch.dtype) -> PackedExperts:
    """experts[e] = (gate [n, H], up [n, H], down [H, n]) at the expert's exact width, or None (width 0)."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"the ragged CPU kernel runs bfloat16 and float32, not {dtype}")
    w13, w2, widths, o13, o2 = [], [], [], [], []
    n13 = n2 = 0
    for ex in experts:
        o13.append(n13)
        o2.append(n2)
        if ex is None or ex[0].shape[0] == 0:
            widths.append(0)
            continue
        gate, up, down = (t.to(dtype).contiguous() for t in ex)
        n = gate.shape[0]
        assert gate.shape == up.shape == (n, hidden) and down.shape == (hidden, n), "expert shapes"
        a, b = _pack_gate_up(gate, up), _pack_down(down)
        w13.append(a)
        w2.append(b)
        n13 += a.numel()
        n2 += b.numel()
        widths.append(n)
    empty = torch.zeros(1, dtype=dtype)  # a layer of width-0 experts still gets a (never read) tensor
    # AMX reads a narrow last neuron block's rows 64 bytes at a time: up to 31 values past the end
    w13.append(torch.zeros(TAIL, dtype=dtype))
    return PackedExperts(
        w13=torch.cat(w13), w2=torch.cat(w2) if w2 else empty,
        widths=torch.tensor(widths, dtype=torch.int32), w13_off=torch.tensor(o13, dtype=torch.int64),
        w2_off=torch.tensor(o2, dtype=torch.int64), max_width=max(widths, default=0),
    )
