"""The exact-width ragged CPU kernel (csrc/ragged_moe_avx512.cpp, packed by ragged_pack.py) against a
float64 reference of the same experts: odd widths, width 1, widths not a multiple of the 16-neuron
block, hidden sizes that leave a partial 64-wide down block, tokens routed only to width-0 experts,
empty batches, many pairs per expert (row blocks), and the packed bytes equal to the exact widths.
Runs where the CPU has AVX-512 BF16 (the machines this project builds on do); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from model_patches.vllm import cpu_ext
from model_patches.vllm.ragged_pack import TAIL, pack_experts

pytestmark = pytest.mark.skipif(not cpu_ext.cpu_has_ragged_isa(), reason="the CPU has no AVX-512 BF16")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    pytest.importorskip("vllm")  # the test environment; the kernel itself needs only torch
    assert cpu_ext.load_ragged(), "the ragged kernel did not build"


def _experts(widths, H, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [None if n == 0 else (
        (torch.randn(n, H, generator=g) * H**-0.5).to(dtype),
        (torch.randn(n, H, generator=g) * H**-0.5).to(dtype),
        (torch.randn(H, n, generator=g) * n**-0.5).to(dtype)) for n in widths]


def _reference(x, ids, wts, experts, act_dtype):
    """sum_j w_j down(silu(gate x) * up x), in float64; the SiLU product rounded to the kernel's
    activation dtype (bf16 for bf16 weights, as vLLM's kernel does)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            ex = experts[int(ids[t, j])]
            if ex is None:
                continue
            g, u, d = (a.double() for a in ex)
            xx = x[t].double()
            h = (torch.nn.functional.silu(g @ xx) * (u @ xx)).to(act_dtype).double()
            out[t] += float(wts[t, j]) * (d @ h)
    return out


def _run(pk, x, ids, wts):
    return torch.ops.heapr_cpu.ragged_moe(x, wts, ids, pk.widths, pk.w13_off, pk.w2_off, pk.w13, pk.w2, pk.max_width)


AMX = torch.ops.heapr_cpu.ragged_amx_rows(-1) > 0 if cpu_ext.load_ragged() else False


@pytest.fixture(params=["avx512", "amx"])
def path(request):
    """Run a test on the AVX-512 path (AMX off) and, where the CPU has AMX, with every expert on AMX
    tiles (threshold 1 pair); the default threshold is restored after."""
    if request.param == "amx" and not AMX:
        pytest.skip("the CPU has no AMX (or the kernel was refused its permission)")
    before = torch.ops.heapr_cpu.ragged_amx_rows(-1)
    torch.ops.heapr_cpu.ragged_amx_rows(1 if request.param == "amx" else 0)
    yield request.param
    torch.ops.heapr_cpu.ragged_amx_rows(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [128, 80, 2064])
@pytest.mark.parametrize("tokens", [1, 3, 17, 70])
def test_kernel_equals_float64_reference(dtype, H, tokens, path):
    widths = [64, 33, 0, 17, 1, 48, 16, 7, 130, 2]
    experts = _experts(widths, H, dtype, seed=H)
    pk = pack_experts(experts, H, dtype)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g).to(dtype)
    K = 3
    ids = torch.stack([torch.randperm(len(widths), generator=g)[:K] for _ in range(tokens)]).to(torch.int32)
    wts = torch.rand(tokens, K, generator=g)
    ref = _reference(x, ids, wts, experts, dtype)
    out = _run(pk, x, ids, wts)
    assert out.dtype == dtype and out.shape == x.shape
    err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
    # fp32: summation order only; bf16: the output's own rounding (2^-8) on top
    assert err < (1e-5 if dtype == torch.float32 else 8e-3), err


def test_width_zero_only_tokens_and_empty_batches_give_zeros():
    H = 128
    experts = _experts([0, 24, 0], H, torch.float32, seed=1)
    pk = pack_experts(experts, H, torch.float32)
    x = torch.randn(4, H)
    ids = torch.tensor([[0, 2], [2, 0], [1, 0], [0, 0]], dtype=torch.int32)
    out = _run(pk, x, ids, torch.ones(4, 2))
    assert torch.equal(out[[0, 1, 3]], torch.zeros(3, H)) and out[2].abs().max() > 0
    assert _run(pk, x[:0], ids[:0], torch.ones(0, 2)).shape == (0, H)
    layer_of_zeros = pack_experts([None, None], H, torch.float32)
    assert torch.equal(_run(layer_of_zeros, x, ids % 2, torch.ones(4, 2)), torch.zeros(4, H))


def test_packed_bytes_are_the_exact_widths():
    """No tile rounding: 3 * n * H values per expert of width n, whatever n (plus the 32 zeros after
    w13 that keep AMX tile loads in bounds)."""
    H, widths = 128, [64, 33, 0, 1, 7]
    for dtype in (torch.float32, torch.bfloat16):
        pk = pack_experts(_experts(widths, H, dtype, seed=2), H, dtype)
        assert pk.w13.numel() == 2 * H * sum(widths) + TAIL and pk.w2.numel() == H * sum(widths)
        assert pk.widths.tolist() == widths and pk.max_width == 64


def test_out_of_range_expert_id_is_refused():
    H = 128
    pk = pack_experts(_experts([16, 16], H, torch.float32, seed=3), H, torch.float32)
    with pytest.raises(RuntimeError, match="expert id 2 out of range"):
        _run(pk, torch.randn(1, H), torch.tensor([[0, 2]], dtype=torch.int32), torch.ones(1, 2))


def test_kernel_is_built_with_openmp_so_it_uses_torchs_threads():
    """Without -fopenmp ATen's parallel_for compiles to a plain loop and the kernel runs on one core
    whatever torch.set_num_threads says; the built library must call into torch's OpenMP pool."""
    with open("/proc/self/maps") as maps:  # the library this process loaded for the op
        span, *_, lib = next(line for line in maps if "heapr_cpu_ragged_" in line).rstrip("\n").split(maxsplit=5)
    if lib.endswith(" (deleted)"):  # another process on this machine rebuilt the shared extension cache since
        lib = f"/proc/self/map_files/{span}"  # the mapped file itself, still readable
    assert b"GOMP_parallel" in open(lib, "rb").read(), f"{lib} was built without OpenMP"


def test_threads_and_token_chunks_do_not_change_the_result():
    """Two threads give the one-thread output bit for bit (each output is one thread's, in a fixed
    order), and a batch longer than one chunk (64 MiB of fp32 pair outputs) equals its chunks run
    separately, bit for bit."""
    H, K = 2048, 8
    widths = [96, 0, 33, 64, 1, 128, 17, 48]
    pk = pack_experts(_experts(widths, H, torch.bfloat16, seed=4), H, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    T = 1024 + 37  # the chunk is 64 MiB / (K * H * 4 B) = 1024 tokens here
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(len(widths), generator=g)[:K] for _ in range(T)]).to(torch.int32)
    wts = torch.rand(T, K, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(pk, x, ids, wts)
        torch.set_num_threads(2)
        two = _run(pk, x, ids, wts)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    parts = torch.cat([_run(pk, x[:1024], ids[:1024], wts[:1024]), _run(pk, x[1024:], ids[1024:], wts[1024:])])
    assert torch.equal(one, parts)
