"""GPTQ of one weight matrix into compressed-tensors' tensors (design §10).

Round-to-nearest rounds every weight on its own; GPTQ (Frantar et al., 2023) rounds the columns of a
weight W [out, in] one at a time and moves each column's rounding error onto the columns not yet
rounded, through the inverse Hessian of the layer's reconstruction loss, H = sum_t x_t x_t^T over
the calibration inputs x_t of this weight. For a routed expert those are only the tokens routed to
it, and the input width is the expert's own kept width (the down projection of a pruned expert sees
its kept neurons only), so ragged experts need nothing special: every expert gets its own H.

As llm-compressor's GPTQModifier does by default: damping of 1 % of the mean diagonal, columns taken
in order of decreasing H_ii ("static" activation order: the scales are computed from the whole
weight first, so the groups stay in the original column order and nothing about the on-disk format
changes), blocks of 128 columns with lazy updates. A column no calibration token touched (H_ii = 0)
is rounded to nearest and moves nothing; a weight no token reached at all is rounded to nearest
exactly as `quantize --method rtn` rounds it. The scale, zero point and packing are compressed-tensors'
(heapr_serve.quantize.rtn), so the bytes are what the ecosystem reads.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from heapr_serve.quantize.rtn import _qparams, pack_weight

DAMP = 0.01
BLOCK = 128


def _grid(scheme: QuantizationScheme):
    """round(x / s) + z clamped to the scheme's grid, and back: the value a quantized weight stands for."""
    args = scheme.weights
    if str(getattr(args.type, "value", args.type)) == "float":
        fp8 = torch.float8_e4m3fn

        def snap(x, s, z):
            return (x / s).clamp(torch.finfo(fp8).min, torch.finfo(fp8).max).to(fp8).to(torch.float32) * s
        return snap
    lo, hi = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1

    def snap(x, s, z):
        return ((x / s).round() + z).clamp(lo, hi).sub(z).mul(s)
    return snap


def _column_params(scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantizationScheme, out_f: int, in_f: int):
    """Per input column j, the scale and zero point of every output row [out, in] (expanded views)."""
    args = scheme.weights
    s = scale.to(torch.float32)
    z = torch.zeros_like(s) if zero is None or args.symmetric else zero.to(torch.float32)
    if args.strategy == QuantizationStrategy.GROUP:
        g = args.group_size
        return s.repeat_interleave(g, 1)[:, :in_f], z.repeat_interleave(g, 1)[:, :in_f]
    if args.strategy == QuantizationStrategy.BLOCK:
        bo, bi = args.block_structure
        rep = lambda t: t.repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]  # noqa: E731
        return rep(s), rep(z)
    return s.expand(out_f, in_f) if s.numel() > 1 else s.reshape(1, 1).expand(out_f, in_f), \
        z.expand(out_f, in_f) if z.numel() > 1 else z.reshape(1, 1).expand(out_f, in_f)


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor | None, scheme: QuantizationScheme,
                damp: float = DAMP, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W_q: the float weight on the scheme's grid [out, in], scale, zero point) of `weight` under the
    Hessian `hessian` [in, in] (sum of x x^T; None or all zero: round to nearest)."""
    w = weight.to(torch.float32).clone()
    out_f, in_f = w.shape
    scale, zero = _qparams(weight, scheme)
    s, z = _column_params(scale, zero, scheme, out_f, in_f)
    snap = _grid(scheme)
    if hessian is None or not bool((hessian.diagonal() > 0).any()):  # compressed-tensors' own rounding: RTN exactly
        return fake_quantize(weight, scale, zero, scheme.weights).to(torch.float32), scale, zero
    h = hessian.to(torch.float32).clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True)
    w, s, z, h = w[:, order], s[:, order], z[:, order], h[order][:, order]
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    hinv = _inverse_cholesky(h)
    q = torch.empty_like(w)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = snap(col, s[:, i1 + i], z[:, i1 + i])
            q[:, i1 + i] = qc
            e = (col - qc) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(order)], scale, zero


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1, as GPTQ uses it; more damping if H is not positive definite."""
    for extra in (0.0, 0.1, 1.0):
        try:
            hh = h + extra * float(h.diagonal().mean()) * torch.eye(len(h), dtype=h.dtype, device=h.device)
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hh)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("the Hessian is not positive definite even with 100 % damping")


def gptq_tensors(weight: torch.Tensor, hessian: torch.Tensor | None, scheme: QuantizationScheme, fmt: str) -> dict[str, torch.Tensor]:
    """The compressed tensors of one Linear weight [out, in] after GPTQ (keys as rtn.quantize_weight's)."""
    q, scale, zero = gptq_weight(weight, hessian, scheme)
    return pack_weight(q, scale, zero, scheme, fmt)
