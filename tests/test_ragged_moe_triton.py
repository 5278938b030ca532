"""Correctness of the ragged-width fused-MoE kernels, the packing helper, the token alignment and the
custom-op registration.

The kernels are checked on CPU under Triton's interpreter. TRITON_INTERPRET=1 has to be in the
environment before triton is imported, and other tests in this pytest process import triton normally,
so the interpreted cases run in one child process (this file run as a script) that prints a JSON line
per case; the parametrised tests below assert on those results. Every case compares against a float64
torch computation made from the *unpacked* per-expert tensors, so packing errors are caught too.

Error bounds (norm-wise relative error ||out - ref|| / ||ref||): the inputs are exact in the
reference and the kernel rounds three times (SiLU*up intermediate, each weighted expert row, the summed
output), each time by at most the unit roundoff u (2^-9 for bf16, 2^-12 for fp16), so the bound is 3u;
typical runs land near 1.4u. (A kernel that truncated instead of rounding lands near 3.8u and fails.)

Over 400 lines: the interpreter-mode kernel cases share module fixtures (packed weights, references)
that a split would rebuild.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

BOUNDS = {"bfloat16": 3 * 2.0**-9, "float16": 3 * 2.0**-12, "float32": 1e-5}


# ------------------------------------------------------------------------------------------------
# Case construction (shared by the child process and the in-process tests)
# ------------------------------------------------------------------------------------------------


def make_case(widths, H, T, topk, dtype, seed, routing="random"):
    """Random per-expert weights of the given widths, hidden states and a top-k routing."""
    g = torch.Generator().manual_seed(seed)
    E = len(widths)
    experts = []
    for i_e in widths:
        if i_e == 0:
            experts.append(None)
            continue
        experts.append((
            (torch.randn(i_e, H, generator=g) * H**-0.5).to(dtype),
            (torch.randn(i_e, H, generator=g) * H**-0.5).to(dtype),
            (torch.randn(H, i_e, generator=g) * i_e**-0.5).to(dtype),
        ))
    hidden = torch.randn(T, H, generator=g).to(dtype)
    if routing == "random":
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :topk]
    elif isinstance(routing, int):  # every token to this expert (topk must be 1)
        ids = torch.full((T, topk), routing, dtype=torch.int64)
    elif routing == "some_negative":  # vLLM's expert_map marks non-local experts with -1
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :topk]
        ids[torch.rand(T, topk, generator=g) < 0.3] = -1
    else:
        raise ValueError(routing)
    weights = torch.softmax(torch.randn(T, topk, generator=g), dim=-1)
    return experts, hidden, ids.to(torch.int32), weights


def reference64(experts, hidden, ids, weights):
    """float64 MoE straight from the per-expert (gate, up, down) tensors."""
    T, H = hidden.shape
    x = hidden.double()
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            ex = experts[e] if e >= 0 else None  # a negative id is a slot with no expert
            if ex is None:
                continue
            gate, up, down = (w.double() for w in ex)
            a = torch.nn.functional.silu(gate @ x[t]) * (up @ x[t])
            out[t] += float(weights[t, j]) * (down @ a)
    return out


def rel_err(out, ref):
    den = ref.norm().item()
    num = (out.double() - ref).norm().item()
    return num / den if den > 0 else num


# ------------------------------------------------------------------------------------------------
# Child process: interpreted kernel cases
# ------------------------------------------------------------------------------------------------


def _interpreted_cases(fresh_seed):
    from model_patches.vllm.kernels.ragged_config import RaggedMoeConfig as C

    small = C(block_m=16, gu_block_n=16, gu_block_k=32, gu_warps=1, gu_stages=1,
              dn_block_n=32, dn_block_k=16, dn_warps=1, dn_stages=1, group_m=1, combine_block=32)
    mixed = [0, 5, 17, 32, 48, 0, 64, 33]
    cases = [
        dict(name="mixed_bf16", widths=mixed, H=64, T=37, topk=2, dtype="bfloat16", cfg=small),
        dict(name="mixed_fp16", widths=mixed, H=64, T=37, topk=2, dtype="float16", cfg=small),
        dict(name="mixed_fp32", widths=mixed, H=64, T=21, topk=2, dtype="float32", cfg=small),
        dict(name="hidden_not_multiple_of_block_k", widths=[7, 0, 40, 16], H=80, T=9, topk=2,
             dtype="bfloat16", cfg=small),
        dict(name="one_token_top8", widths=mixed, H=64, T=1, topk=8, dtype="bfloat16", cfg=small),
        dict(name="all_tokens_to_one_expert", widths=[5, 0, 17, 9], H=64, T=40, topk=1,
             dtype="bfloat16", cfg=small, routing=2),
        dict(name="top1", widths=[0, 5, 17, 32, 48, 0], H=64, T=30, topk=1, dtype="bfloat16",
             cfg=small),
        dict(name="top8_16_experts", widths=[0, 5, 17, 32, 48, 0, 64, 33, 1, 16, 0, 31, 2, 47, 0, 8],
             H=64, T=12, topk=8, dtype="bfloat16", cfg=small),
        dict(name="tokens_only_on_width0_experts", widths=[0, 0, 17, 0], H=64, T=10, topk=2,
             dtype="bfloat16", cfg=small),
        dict(name="all_width0", widths=[0, 0, 0], H=64, T=5, topk=2, dtype="bfloat16", cfg=small),
        dict(name="blocks32_group3", widths=[33, 0, 64, 20, 1, 40], H=96, T=48, topk=2,
             dtype="bfloat16",
             cfg=C(block_m=32, gu_block_n=32, gu_block_k=32, gu_warps=1, gu_stages=1,
                   dn_block_n=32, dn_block_k=32, dn_warps=1, dn_stages=1, group_m=3,
                   combine_block=64)),
        # choose_config's regimes by mean pairs per expert: <=4, <=16, <=40, more.
        dict(name="heuristic_config_bm32", widths=[96, 40, 0, 128], H=128, T=64, topk=2,
             dtype="bfloat16", cfg=None),
        dict(name="heuristic_config_bm128", widths=[96, 40, 0, 128], H=128, T=96, topk=2,
             dtype="bfloat16", cfg=None),
        dict(name="heuristic_config_bm16", widths=[96, 40, 0, 128], H=128, T=24, topk=2,
             dtype="bfloat16", cfg=None),
        dict(name="custom_op_heuristic_config", widths=mixed, H=128, T=6, topk=3, dtype="bfloat16",
             cfg="op"),
        dict(name="negative_ids_are_empty_slots", widths=mixed, H=64, T=23, topk=3,
             dtype="bfloat16", cfg=small, routing="some_negative"),
        # Every float buffer the launcher allocates starts as NaN: reading any element the kernels did
        # not write (even to multiply it by zero) would make the output non-finite.
        dict(name="nan_poisoned_buffers", widths=mixed, H=80, T=37, topk=2, dtype="bfloat16",
             cfg=small, poison=True),
        dict(name="nan_poisoned_buffers_heuristic", widths=[96, 40, 0, 128, 17], H=128, T=96,
             topk=2, dtype="bfloat16", cfg=None, poison=True),
        # Long batches run in token chunks (vLLM's VLLM_FUSED_MOE_CHUNK_SIZE): bounded work buffers,
        # the same output; chunks of 8 split 37 tokens unevenly, and the heuristic config is per chunk.
        dict(name="chunked_tokens", widths=mixed, H=64, T=37, topk=2, dtype="bfloat16", cfg=small, chunk=8),
        dict(name="chunked_tokens_heuristic", widths=[96, 40, 0, 128, 17], H=128, T=96, topk=2,
             dtype="bfloat16", cfg=None, chunk=40, poison=True),
        # Small batches align with the one-program Triton kernel; this forces the torch sort path.
        dict(name="torch_alignment_path", widths=mixed, H=64, T=37, topk=2, dtype="bfloat16",
             cfg=small, torch_align=True),
    ]
    # Random ragged layouts drawn from the run's seed (fixed unless HEAPR_KERNEL_SEED says otherwise,
    # and reported with every result, so a failure reruns exactly).
    rng = torch.Generator().manual_seed(fresh_seed)
    for i in range(3):
        E = int(torch.randint(3, 13, (1,), generator=rng))
        widths = [0 if float(torch.rand(1, generator=rng)) < 0.25
                  else int(torch.randint(1, 71, (1,), generator=rng)) for _ in range(E)]
        bm, bn, bk, dn, dk = (int(v[int(torch.randint(len(v), (1,), generator=rng))])
                              for v in ([16, 32], [16, 32], [16, 32, 64], [16, 32], [16, 32]))
        cases.append(dict(
            name=f"fresh_random_{i}", widths=widths,
            H=int([64, 96, 128][int(torch.randint(3, (1,), generator=rng))]),
            T=int(torch.randint(1, 49, (1,), generator=rng)),
            topk=int(torch.randint(1, min(E, 8) + 1, (1,), generator=rng)), dtype="bfloat16",
            cfg=C(block_m=bm, gu_block_n=bn, gu_block_k=bk, gu_warps=1, gu_stages=1,
                  dn_block_n=dn, dn_block_k=dk, dn_warps=1, dn_stages=1,
                  group_m=int(torch.randint(1, 4, (1,), generator=rng)), combine_block=32)))
    return cases


def _check_triton_alignment(align, fresh_seed):
    """The one-program Triton alignment must give exactly the torch alignment's output."""
    g = torch.Generator().manual_seed(fresh_seed)
    mismatches, n_cases = [], 0
    for E in [1, 5, 16, 40]:
        for T, k in [(1, 1), (1, 8), (3, 2), (17, 4), (64, 8)]:
            if k > E:
                continue
            for bm in [16, 32]:
                widths = (torch.randint(0, 4, (E,), generator=g)
                          * (torch.rand(E, generator=g) > 0.3)).to(torch.int32)
                ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
                ids = ids.to(torch.int32 if n_cases % 2 else torch.int64)
                if n_cases % 3 == 0:  # empty slots (expert_map's -1)
                    ids[torch.rand(ids.shape, generator=g) < 0.25] = -1
                a = align.align_tokens(ids, widths, bm)
                b = align.align_tokens_triton(ids, widths, bm)
                n_cases += 1
                if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
                    mismatches.append(dict(E=E, T=T, k=k, block_m=bm, widths=widths.tolist()))
    print(json.dumps({"name": "align_triton_equals_torch", "cases": n_cases,
                      "mismatches": mismatches, "seed": fresh_seed}), flush=True)


def _run_interpreted(fresh_seed):
    assert os.environ.get("TRITON_INTERPRET") == "1", "the child must run under TRITON_INTERPRET=1"
    import model_patches.vllm.kernels.ragged_moe_triton as rmt
    from model_patches.vllm.kernels import ragged_align
    from model_patches.vllm.kernels.ragged_layout import pack_ragged_experts
    from model_patches.vllm.kernels.ragged_moe_triton import ragged_fused_moe

    _check_triton_alignment(ragged_align, fresh_seed)
    for k, case in enumerate(_interpreted_cases(fresh_seed)):
        dtype = getattr(torch, case["dtype"])
        experts, hidden, ids, weights = make_case(case["widths"], case["H"], case["T"], case["topk"],
                                                  dtype, seed=1000 + k + fresh_seed,
                                                  routing=case.get("routing", "random"))
        packed = pack_ragged_experts(experts, hidden_size=case["H"])
        rmt.TRITON_ALIGN_MAX_PAIRS = 0 if case.get("torch_align") else 1024
        real_empty = torch.empty
        if case.get("poison"):
            def poisoned_empty(*args, **kwargs):
                t = real_empty(*args, **kwargs)
                return t.fill_(float("nan")) if t.is_floating_point() else t
            torch.empty = poisoned_empty
        try:
            if case["cfg"] == "op":  # through the registered op, as the vLLM layer calls it
                out = packed.op(hidden, ids, weights)
            else:
                out = ragged_fused_moe(hidden, packed, ids, weights, config=case["cfg"], chunk_tokens=case.get("chunk"))
        finally:
            torch.empty = real_empty
        ref = reference64(experts, hidden, ids, weights)
        dead = [t for t in range(case["T"])
                if all(int(e) < 0 or case["widths"][int(e)] == 0 for e in ids[t])]
        print(json.dumps({
            "name": case["name"], "dtype": case["dtype"], "seed": fresh_seed,
            "widths": case["widths"], "H": case["H"], "T": case["T"], "topk": case["topk"],
            "shape_ok": tuple(out.shape) == tuple(hidden.shape) and out.dtype == dtype,
            "finite": bool(torch.isfinite(out).all()),
            "rel_err": rel_err(out, ref),
            "ref_norm": ref.norm().item(),
            "dead_rows": len(dead),
            "dead_rows_exact_zero": bool((out[dead] == 0).all()) if dead else True,
        }), flush=True)


CASE_NAMES = ["mixed_bf16", "mixed_fp16", "mixed_fp32", "hidden_not_multiple_of_block_k",
              "one_token_top8", "all_tokens_to_one_expert", "top1", "top8_16_experts",
              "tokens_only_on_width0_experts", "all_width0", "blocks32_group3",
              "heuristic_config_bm32", "heuristic_config_bm128", "heuristic_config_bm16",
              "custom_op_heuristic_config", "negative_ids_are_empty_slots", "nan_poisoned_buffers",
              "nan_poisoned_buffers_heuristic", "chunked_tokens", "chunked_tokens_heuristic", "torch_alignment_path",
              "fresh_random_0", "fresh_random_1", "fresh_random_2"]


# The seed of the random layouts: the same every run, so the suite is deterministic and a failure
# reruns as it was; HEAPR_KERNEL_SEED=N draws other layouts (each failure names its seed).
DEFAULT_SEED = 14


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton")
    text = os.environ.get("HEAPR_KERNEL_SEED", str(DEFAULT_SEED))
    if not text.isdigit():
        pytest.fail(f"HEAPR_KERNEL_SEED={text!r}: give a non-negative integer")
    seed = int(text)
    print(f"interpreted kernel cases: seed {seed} (rerun with HEAPR_KERNEL_SEED={seed})")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpreted", str(seed)],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"interpreted kernel run failed (seed {seed}):\n{proc.stdout}\n{proc.stderr}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in rows}


def test_triton_alignment_equals_torch_alignment(interpreted_results):
    r = interpreted_results["align_triton_equals_torch"]
    assert r["cases"] == 28 and r["mismatches"] == [], r


@pytest.mark.parametrize("name", CASE_NAMES)
def test_kernel_matches_float64_reference(interpreted_results, name):
    r = interpreted_results[name]
    assert r["shape_ok"] and r["finite"], r
    assert r["dead_rows_exact_zero"], r
    if r["ref_norm"] == 0:  # every slot on a width-0 expert
        assert r["rel_err"] == 0, r
    else:
        assert r["rel_err"] <= BOUNDS[r["dtype"]], r


def test_heuristic_regimes_are_the_ones_tested(config):
    """The heuristic cases above really run the four tile regimes (block_m 16 twice, 32, 128)."""
    pick = lambda T: config.choose_config(T, 2, 4, 128, 128)  # noqa: E731  (topk 2, 4 experts)
    op_case = config.choose_config(6, 3, 8, 128, 64)  # custom_op case: 2.25 pairs per expert
    assert op_case.block_m == 16 and op_case.gu_block_n == 32
    assert pick(24).block_m == 16 and pick(24).gu_block_n == 64
    assert pick(64).block_m == 32
    assert pick(96).block_m == 128 and pick(96).dn_block_n == 256


def test_fit_to_shared_memory(config):
    big = config.choose_config(8192, 8, 128, 2048, 768)  # 128x256x64 down tiles, 4 stages = 192 KB
    assert config.fit_to_shared_memory(big, 2, 227 * 1024) == big  # H100 / H200: unchanged
    a100 = config.fit_to_shared_memory(big, 2, 163 * 1024)
    assert a100.dn_stages == 3 and a100.gu_stages == big.gu_stages  # gate/up needs 128 KB only
    assert (a100.block_m, a100.dn_block_n, a100.dn_block_k) == (128, 256, 64)  # tiles kept
    assert config.fit_to_shared_memory(big, 2, 1).dn_stages == 1


def _compile_sm90(fn, arg_types, constexprs, num_warps, num_stages):
    """Ahead-of-time compile a kernel for an H100 (sm_90) with Triton's bundled ptxas: no GPU needed.
    Pointers and the int args listed with '/16' get the divisibility-by-16 hint the JIT would give."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no AOT compile API")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty = arg_types[name]
        if ty.startswith("*") or ty.endswith("/16"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        signature[name] = ty.removesuffix("/16")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    except (FileNotFoundError, PermissionError) as exc:  # no bundled ptxas on this install
        pytest.skip(f"cannot run ptxas: {exc}")


@pytest.mark.parametrize("tokens", [1, 4096])
def test_kernels_compile_for_h100(jit, config, tokens):
    """The interpreter does not compile anything; this does, for sm_90, with the decode and the
    large-batch tile regimes on DeepSeek-V3's shape: no compile error, staged tiles within an H100's
    227 KB of shared memory, tensor-core instructions (wgmma for the 128-row tiles) and cp.async
    pipelining present. (All four regimes on both layer shapes were checked the same way, with
    no register spills, when this was written.)"""
    if not jit.HAS_TRITON:
        pytest.skip("no triton")
    cfg = config.choose_config(tokens, 8, 256, 7168, 2048)
    common = dict(sorted_ids_ptr="*i32", block_expert_ptr="*i32", widths_ptr="*i32",
                  num_pairs="i32", num_m="i32", num_n="i32")
    gu = _compile_sm90(
        jit.ragged_gate_up_kernel,
        dict(common, x_ptr="*bf16", w13_ptr="*bf16", inter_ptr="*bf16", w13_off_ptr="*i64",
             K="i32/16", topk="i32", stride_xm="i32/16", stride_wn="i32/16", stride_im="i32/16"),
        dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.gu_block_n, BLOCK_K=cfg.gu_block_k,
             GROUP_M=cfg.group_m, EVEN_K=True, INTERP_BF16=False), cfg.gu_warps, cfg.gu_stages)
    dn = _compile_sm90(
        jit.ragged_down_kernel,
        dict(common, inter_ptr="*bf16", w2t_ptr="*bf16", buf_ptr="*bf16", topk_w_ptr="*fp32",
             w2_off_ptr="*i64", N="i32/16", stride_im="i32/16", stride_wk="i32/16",
             stride_bm="i32/16"),
        dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.dn_block_n, BLOCK_K=cfg.dn_block_k,
             GROUP_M=cfg.group_m, EVEN_N=True, INTERP_BF16=False), cfg.dn_warps, cfg.dn_stages)
    for k in (gu, dn):
        assert k.metadata.shared <= 227 * 1024
        ptx = k.asm["ptx"]
        assert ("wgmma" in ptx) if cfg.block_m >= 64 else ("mma.sync" in ptx)
        assert "cp.async" in ptx
    if tokens == 1:  # the small kernels once
        _compile_sm90(jit.combine_kernel,
                      dict(buf_ptr="*bf16", out_ptr="*bf16", topk_ids_ptr="*i32", widths_ptr="*i32",
                           N="i32/16", topk="i32", stride_bm="i32/16", stride_om="i32/16"),
                      dict(BLOCK=1024, INTERP_BF16=False), 4, 1)
        _compile_sm90(jit.align_small_kernel,
                      dict(ids_ptr="*i32", widths_ptr="*i32", sorted_ids_ptr="*i32",
                           block_expert_ptr="*i32", n="i32", E="i32", max_blocks="i32"),
                      dict(BLOCK_M=16, E_P2=256, CHUNK=64), 4, 1)


def test_bench_script_without_gpu_exits_with_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                         "bench_kernel_gpu.py")
    proc = subprocess.run([sys.executable, bench, "--tokens", "1"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc
    assert len(proc.stderr.strip().splitlines()) == 1 and "GPU" in proc.stderr, proc.stderr


def test_bench_pruned_widths_hit_the_ratio():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        "bench_kernel_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_kernel_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for E, I in [(128, 768), (256, 2048)]:
        for r in (0.25, 0.5):
            w = bench.pruned_widths(E, I, r, 64, seed=1)
            assert len(w) == E and all(0 <= x <= I and x % 64 == 0 for x in w)
            assert abs(sum(w) - (1 - r) * E * I) < 64
            assert min(w) < max(w)  # ragged, not uniform


def test_interpreted_cases_cover_the_edges(interpreted_results):
    """The issue's edge cases are really in the set (not just named)."""
    assert set(interpreted_results) == set(CASE_NAMES) | {"align_triton_equals_torch"}
    r = interpreted_results
    assert 0 in r["mixed_bf16"]["widths"] and any(w % 16 for w in r["mixed_bf16"]["widths"])
    assert r["one_token_top8"]["T"] == 1 and r["one_token_top8"]["topk"] == 8
    assert r["top1"]["topk"] == 1 and r["top8_16_experts"]["topk"] == 8
    assert r["tokens_only_on_width0_experts"]["dead_rows"] > 0
    assert r["all_width0"]["dead_rows"] == r["all_width0"]["T"]


# ------------------------------------------------------------------------------------------------
# In-process tests: packing, alignment, torch fallback, custom op
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rmt():
    import model_patches.vllm.kernels.ragged_moe_triton as mod  # also registers heapr::ragged_fused_moe

    return mod


@pytest.fixture(scope="module")
def layout():
    import model_patches.vllm.kernels.ragged_layout as mod

    return mod


@pytest.fixture(scope="module")
def align():
    import model_patches.vllm.kernels.ragged_align as mod

    return mod


@pytest.fixture(scope="module")
def config():
    import model_patches.vllm.kernels.ragged_config as mod

    return mod


@pytest.fixture(scope="module")
def jit():
    import model_patches.vllm.kernels.ragged_jit as mod

    return mod


def test_pack_layout_and_offsets(layout):
    widths = [3, 0, 5, 1]
    experts, *_ = make_case(widths, H=8, T=1, topk=1, dtype=torch.float32, seed=0)
    p = layout.pack_ragged_experts(experts)
    assert p.widths.tolist() == widths and p.widths.dtype == torch.int32
    assert p.w13_offsets.tolist() == [0, 6, 6, 16] and p.w2_offsets.tolist() == [0, 3, 3, 8]
    assert p.w13_offsets.dtype == torch.int64 and p.w2_offsets.dtype == torch.int64
    assert p.w13.shape == (18, 8) and p.w2t.shape == (9, 8) and p.max_width == 5
    assert p.w13.is_contiguous() and p.w2t.is_contiguous()
    for e, i_e in enumerate(widths):
        if i_e == 0:
            continue
        gate, up, down = experts[e]
        o13, o2 = p.w13_offsets[e].item(), p.w2_offsets[e].item()
        assert torch.equal(p.w13[o13:o13 + i_e], gate)
        assert torch.equal(p.w13[o13 + i_e:o13 + 2 * i_e], up)
        assert torch.equal(p.w2t[o2:o2 + i_e], down.t())


def test_pack_rejects_bad_shapes(layout):
    g = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="expert 1"):
        layout.pack_ragged_experts([(g, g, torch.zeros(8, 4)), (g, g, torch.zeros(8, 3))])
    with pytest.raises(ValueError, match="expert 0"):
        layout.pack_ragged_experts([(g, None, None)])
    with pytest.raises(ValueError, match="hidden_size"):
        layout.pack_ragged_experts([None, None])
    p = layout.pack_ragged_experts([None, (torch.zeros(0, 8),) * 2 + (torch.zeros(8, 0),)],
                                   hidden_size=8)
    assert p.widths.tolist() == [0, 0] and p.w13.shape == (0, 8) and p.max_width == 0


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_tokens_invariants(align, block_m):
    g = torch.Generator().manual_seed(block_m)
    widths = torch.tensor([0, 3, 0, 7, 2, 9, 0, 1], dtype=torch.int32)
    E = widths.numel()
    for T, k in [(1, 1), (1, 8), (13, 2), (40, 3), (64, 8)]:
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
        sorted_ids, block_expert = align.align_tokens(ids, widths, block_m)
        n = T * k
        nb = align.max_blocks_bound(n, E, block_m)
        assert sorted_ids.shape == (nb * block_m,) and block_expert.shape == (nb,)
        assert sorted_ids.dtype == torch.int32 and block_expert.dtype == torch.int32
        flat = ids.reshape(-1)
        live = [p for p in range(n) if widths[flat[p]] > 0]
        real = sorted_ids[sorted_ids < n].tolist()
        assert sorted(real) == live  # every live pair exactly once, no dead pair
        assert ((sorted_ids == n) | (sorted_ids < n)).all()
        used = block_expert[block_expert >= 0]
        assert (block_expert[: used.numel()] >= 0).all() and (block_expert[used.numel():] == -1).all()
        assert (used[1:] >= used[:-1]).all()  # experts in order
        assert (widths[used.long()] > 0).all()  # no block for a width-0 expert
        for b in range(nb):
            rows = sorted_ids[b * block_m:(b + 1) * block_m]
            rows = rows[rows < n]
            if block_expert[b] < 0:
                assert rows.numel() == 0
            else:
                assert rows.numel() > 0  # no empty block: exactly ceil(count/block_m) per expert
                assert (flat[rows.long()] == block_expert[b]).all()
                assert (rows[1:] > rows[:-1]).all()  # stable order inside an expert
        counts = torch.bincount(flat[live], minlength=E) if live else torch.zeros(E, dtype=torch.long)
        assert used.numel() == int(((counts + block_m - 1) // block_m).sum())


def test_align_tokens_drops_negative_ids(align):
    widths = torch.tensor([2, 0, 5], dtype=torch.int32)
    ids = torch.tensor([[0, -1], [-1, 2], [1, 2], [-1, -1]])
    sorted_ids, block_expert = align.align_tokens(ids, widths, 2)
    n = ids.numel()
    assert sorted(sorted_ids[sorted_ids < n].tolist()) == [0, 3, 5]  # pairs on experts 0 and 2
    assert block_expert.tolist()[:2] == [0, 2] and (block_expert[2:] == -1).all()


def test_align_tokens_all_dead_and_empty(align):
    widths = torch.tensor([0, 0], dtype=torch.int32)
    sorted_ids, block_expert = align.align_tokens(torch.zeros(3, 1, dtype=torch.int64), widths, 4)
    assert (block_expert == -1).all() and (sorted_ids == 3).all()
    s, b = align.align_tokens(torch.zeros(0, 2, dtype=torch.int64), widths, 4)
    assert s.numel() == 0 and b.numel() == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_torch_fallback_matches_float64(rmt, layout, dtype):
    """Without a GPU (and outside the interpreter) ragged_fused_moe runs the torch path."""
    dt = getattr(torch, dtype)
    widths = [0, 5, 17, 32, 0, 9]
    experts, hidden, ids, weights = make_case(widths, H=32, T=11, topk=3, dtype=dt, seed=7)
    packed = layout.pack_ragged_experts(experts)
    out = rmt.ragged_fused_moe(hidden, packed, ids, weights)
    assert out.shape == hidden.shape and out.dtype == dt
    assert rel_err(out, reference64(experts, hidden, ids, weights)) <= BOUNDS[dtype]
    assert rmt.ragged_fused_moe(hidden[:0], packed, ids[:0], weights[:0]).shape == (0, 32)


def test_input_checks(rmt, layout):
    experts, hidden, ids, weights = make_case([4, 0], H=16, T=3, topk=1, dtype=torch.float32, seed=1)
    packed = layout.pack_ragged_experts(experts)
    with pytest.raises(ValueError, match="hidden size"):
        rmt.ragged_fused_moe(hidden[:, :8], packed, ids, weights)
    with pytest.raises(ValueError, match="cast at load time"):
        rmt.ragged_fused_moe(hidden.half(), packed, ids, weights)
    with pytest.raises(ValueError, match="topk_weights"):
        rmt.ragged_fused_moe(hidden, packed, ids, weights[:, :0])


def test_custom_op_registered_with_fake(rmt, layout):
    op = torch.ops.heapr.ragged_fused_moe
    assert str(op.default._schema) == (
        "heapr::ragged_fused_moe(Tensor hidden, Tensor w13, Tensor w2t, Tensor widths, "
        "Tensor w13_offsets, Tensor w2_offsets, Tensor topk_ids, Tensor topk_weights, "
        "SymInt max_width) -> Tensor")
    experts, hidden, ids, weights = make_case([0, 6, 3], H=16, T=5, topk=2, dtype=torch.bfloat16,
                                              seed=3)
    p = layout.pack_ragged_experts(experts)
    args = (hidden, p.w13, p.w2t, p.widths, p.w13_offsets, p.w2_offsets, ids, weights, p.max_width)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert fake.shape == (5, 16) and fake.dtype == torch.bfloat16
    # opcheck: schema, fake vs real (torch fallback on CPU), and torch.compile tracing.
    torch.library.opcheck(op, args)


def test_custom_op_under_torch_compile(rmt, layout):
    """fullgraph=True fails on any graph break: the op must trace through its fake impl."""
    experts, hidden, ids, weights = make_case([0, 6, 3, 9], H=16, T=4, topk=2, dtype=torch.float32,
                                              seed=4)
    p = layout.pack_ragged_experts(experts)

    def layer(x, ids, w):
        return torch.ops.heapr.ragged_fused_moe(x * 2, p.w13, p.w2t, p.widths, p.w13_offsets,
                                                p.w2_offsets, ids, w, p.max_width) + 1

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(hidden, ids, weights), layer(hidden, ids, weights))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_custom_op_under_cuda_graph_capture(rmt, layout, tokens):
    """vLLM captures decode batches in CUDA graphs: the op must capture (no host sync, no allocation
    outside the graph's pool) and a replay on new inputs written into the captured buffers must give the
    eager result of those inputs."""
    experts, hidden, ids, weights = make_case([0, 6, 33, 9, 64, 17, 0, 40], H=128, T=tokens, topk=2,
                                              dtype=torch.bfloat16, seed=7)
    _, hidden2, ids2, weights2 = make_case([0, 6, 33, 9, 64, 17, 0, 40], H=128, T=tokens, topk=2,
                                           dtype=torch.bfloat16, seed=8)
    p = layout.pack_ragged_experts(experts).to("cuda")
    x, i, w = hidden.cuda(), ids.cuda(), weights.cuda()
    p.op(x, i, w)  # compile the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = p.op(x, i, w)
    x.copy_(hidden2.cuda()), i.copy_(ids2.cuda()), w.copy_(weights2.cuda())
    graph.replay()
    torch.cuda.synchronize()
    eager = p.op(hidden2.cuda(), ids2.cuda(), weights2.cuda())
    assert torch.equal(out, eager)
    assert rel_err(out.cpu(), reference64(experts, hidden2, ids2, weights2)) <= BOUNDS["bfloat16"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpreted":
        _run_interpreted(int(sys.argv[2]))
    else:
        sys.exit("usage: TRITON_INTERPRET=1 python tests/test_ragged_moe_triton.py --interpreted SEED")


def test_kernel_choice_is_said_and_only_a_missing_import_means_absent(monkeypatch):
    """`ragged_op_status` says why the ragged CUDA kernel is usable or not; a kernel module that
    fails in any other way than a missing import is an error to see, not a silent fall back."""
    import importlib.abc

    import model_patches.vllm.kernels.ragged_moe_triton  # noqa: F401  (registers the op)
    from model_patches.vllm.cuda_ragged import ragged_op_status

    ok, why = ragged_op_status()
    assert ok and "heapr::ragged_fused_moe" in why

    class Broken(importlib.abc.MetaPathFinder):
        def __init__(self, exc):
            self.exc = exc

        def find_spec(self, name, path=None, target=None):
            if name == "model_patches.vllm.kernels.ragged_moe_triton":
                raise self.exc
            return None

    monkeypatch.delitem(sys.modules, "model_patches.vllm.kernels.ragged_moe_triton")
    monkeypatch.setattr(sys, "meta_path", [Broken(ImportError("no module named triton")), *sys.meta_path])
    ok, why = ragged_op_status()
    assert not ok and "does not import" in why and "triton" in why
    sys.meta_path[0] = Broken(RuntimeError("a bug in the kernel module"))
    with pytest.raises(RuntimeError, match="a bug"):
        ragged_op_status()
