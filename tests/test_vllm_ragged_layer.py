"""The ragged MoE layer alone, in real vLLM layers (FusedMoEFactory -> MoERunner, stock gate and router,
vLLM's CPU kernel): bucket dispatch is exact against the stock layer on zero-padded weights, for many
routing patterns and batch sizes; the tensor-parallel split of widths is a partition.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from model_patches.vllm.buckets import choose_layout, plan_buckets, plan_slices, rank_share, rank_widths  # noqa: E402

H, E, I, TOP_K = 128, 8, 64, 2
WIDTHS = [64, 32, 0, 48, 16, 64, 24, 0]


@pytest.mark.parametrize("width", [0, 1, 16, 24, 48, 64, 768, 1000])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_tensor_parallel_shares_partition_every_expert(width, tp):
    shares = [rank_share(width, tp, r) for r in range(tp)]
    assert shares[0][0] == 0 and shares[-1][1] == width
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1


def test_tensor_parallel_partial_outputs_sum_to_the_expert():
    """What each rank computes from its share (gate/up rows, down columns) adds up to the expert
    (in float64: the sums reach ~1e3, where float32's BLAS summation order shows at 1e-4)."""
    torch.manual_seed(0)
    gate, up, down, x = (torch.randn(*s, dtype=torch.float64) for s in ((48, H), (48, H), (H, 48), (3, H)))
    full = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    for tp in (2, 3, 5):
        total = sum(
            (torch.nn.functional.silu(x @ gate[lo:hi].T) * (x @ up[lo:hi].T)) @ down[:, lo:hi].T
            for lo, hi in (rank_share(48, tp, r) for r in range(tp))
        )
        torch.testing.assert_close(total, full, rtol=1e-10, atol=1e-9)


def test_buckets_group_by_padded_width_and_skip_width_zero():
    buckets = plan_buckets(WIDTHS, 1, 0, 32)
    assert [b.width for b in buckets] == [64, 32]
    assert sorted(e for b in buckets for e in b.experts) == [0, 1, 3, 4, 5, 6]
    assert set(buckets[0].experts) == {0, 3, 5} and set(buckets[1].experts) == {1, 4, 6}


def test_tensor_parallel_split_keeps_tile_multiples():
    """96 at TP 2 and tile 32 splits 32 + 64 (no padding), not 48 + 48 (padded to 64 + 64)."""
    assert [rank_share(96, 2, r, 32) for r in range(2)] == [(0, 32), (32, 96)]
    assert rank_widths([96, 64, 48, 0], 2, 1, 32) == [64, 32, 32, 0]
    assert sum(rank_widths([96], 2, r, 32)[0] for r in range(2)) == 96


@pytest.mark.parametrize("tp", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plans_never_pad_past_tile_rounding(tp, seed):
    """Either layout holds each rank's neurons rounded up to the tile, no more."""
    from tools.moe_layer import pruned_widths

    widths = pruned_widths(32, 768, 0.3, 1, seed)
    for r in range(tp):
        rw = rank_widths(widths, tp, r, 32)
        allowed = sum(-(-w // 32) * 32 for w in rw)
        assert sum(b.width * len(b.experts) for b in plan_buckets(widths, tp, r, 32)) == allowed
        sl = plan_slices(widths, tp, r, 32)
        assert sl.size * sl.width == allowed
        assert sorted(sl.start[e] + i for e in range(32) for i in range(sl.count[e])) == list(range(sl.size))


def test_cost_model_picks_one_call_for_small_layers_and_buckets_for_wide_ones():
    from tools.moe_layer import pruned_widths

    assert choose_layout(pruned_widths(16, 64, 0.25, 1, 1), 1, 0, 32, 128, 2) == "slices"  # bundled model
    assert choose_layout(pruned_widths(128, 768, 0.25, 32, 1), 1, 0, 32, 2048, 8) == "buckets"  # Qwen3-30B-A3B
    assert choose_layout([64] * 8, 1, 0, 32, 128, 2) == "buckets"  # unpruned: the stock call


@pytest.fixture(scope="module")
def layers():
    from tools.moe_layer import build_layer, setup_vllm

    cfg = setup_vllm(torch.float32, 256)
    torch.manual_seed(0)
    gate_w = torch.randn(E, H) * 0.5
    gate_up = torch.randn(E, 2 * I, H) * H**-0.5
    down = torch.randn(E, H, I) * I**-0.5
    # zero-padded dense equivalent of the pruned layer: neurons >= width are zero
    padded_gate_up, padded_down = gate_up.clone(), down.clone()
    for e, w in enumerate(WIDTHS):
        padded_gate_up[e, w:I] = 0
        padded_gate_up[e, I + w :] = 0
        padded_down[e, :, w:] = 0
    built = {
        "stock": build_layer(cfg, "model.layers.0.mlp", H, E, I, TOP_K, torch.float32, None, (gate_w, gate_up, down)),
        "ours_full": build_layer(cfg, "model.layers.1.mlp", H, E, I, TOP_K, torch.float32, [I] * E, (gate_w, gate_up, down)),
        "stock_padded": build_layer(cfg, "model.layers.2.mlp", H, E, I, TOP_K, torch.float32, None, (gate_w, padded_gate_up, padded_down)),
        "ours_pruned": build_layer(cfg, "model.layers.3.mlp", H, E, I, TOP_K, torch.float32, WIDTHS, (gate_w, gate_up, down)),
        "ours_buckets": build_layer(cfg, "model.layers.4.mlp", H, E, I, TOP_K, torch.float32, WIDTHS, (gate_w, gate_up, down), "buckets"),
        "ours_slices": build_layer(cfg, "model.layers.5.mlp", H, E, I, TOP_K, torch.float32, WIDTHS, (gate_w, gate_up, down), "slices"),
    }
    return cfg, built


def _forward(cfg, runner, x):
    from vllm.forward_context import set_forward_context

    with torch.inference_mode(), set_forward_context(None, cfg, num_tokens=x.shape[0]):
        return runner.forward(x, x).clone()


@pytest.mark.parametrize("tokens", [1, 3, 17, 200])
def test_pruned_layer_equals_stock_layer_on_zero_padded_weights(layers, tokens):
    cfg, built = layers
    torch.manual_seed(tokens)
    x = torch.randn(tokens, H)
    assert torch.equal(_forward(cfg, built["ours_full"], x), _forward(cfg, built["stock"], x))
    ours, ref = _forward(cfg, built["ours_pruned"], x), _forward(cfg, built["stock_padded"], x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours - _forward(cfg, built["stock"], x)).abs().max() > 1e-2  # pruning does change the output


@pytest.mark.parametrize("layout", ["buckets", "slices"])
@pytest.mark.parametrize("tokens", [1, 2, 9, 130])
def test_both_layouts_native_and_python_equal_stock_on_zero_padded_weights(layers, layout, tokens):
    """The native op and the Python path of each layout give the zero-padded stock output (1e-5)."""
    cfg, built = layers
    runner = built[f"ours_{layout}"]
    method = runner.routed_experts.quant_method
    assert method.layout == layout and method.native  # the C++ op built on this machine
    torch.manual_seed(100 + tokens)
    x = torch.randn(tokens, H)
    ref = _forward(cfg, built["stock_padded"], x)
    native = _forward(cfg, runner, x)
    method.native = False
    try:
        python = _forward(cfg, runner, x)
    finally:
        method.native = True
    torch.testing.assert_close(native, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(python, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
def test_ragged_kernel_layer_is_the_default_and_equals_stock_on_zero_padded_weights(layers, dtype, tokens):
    """Where the CPU has AVX-512 BF16 a pruned SiLU layer runs the exact-width kernel by default: its
    expert parameters are the exact widths (no tile rounding, buckets gone) and its output is the
    stock layer's on the zero-padded weights (float32 1e-5; bfloat16 within two output roundings)."""
    from model_patches.vllm import cpu_ext
    from tools.moe_layer import build_layer

    if not cpu_ext.cpu_has_ragged_isa():
        pytest.skip("the CPU has no AVX-512 BF16")
    cfg, built = layers
    if dtype == torch.float32:
        ours, padded = built["ours_pruned"], built["stock_padded"]
    else:
        key = ("bf16_pair",)  # the fixture's weights, rebuilt in bfloat16 (once)
        if key not in built:
            torch.manual_seed(0)
            gate_w = torch.randn(E, H) * 0.5
            gate_up, down = torch.randn(E, 2 * I, H) * H**-0.5, torch.randn(E, H, I) * I**-0.5
            padded_gate_up, padded_down = gate_up.clone(), down.clone()
            for e, w in enumerate(WIDTHS):
                padded_gate_up[e, w:I] = 0
                padded_gate_up[e, I + w:] = 0
                padded_down[e, :, w:] = 0
            built[key] = (
                build_layer(cfg, "model.layers.20.mlp", H, E, I, TOP_K, torch.bfloat16, WIDTHS,
                            (gate_w, gate_up.bfloat16(), down.bfloat16())),
                build_layer(cfg, "model.layers.21.mlp", H, E, I, TOP_K, torch.bfloat16, None,
                            (gate_w, padded_gate_up.bfloat16(), padded_down.bfloat16())),
            )
        ours, padded = built[key]
    method = ours.routed_experts.quant_method
    assert method.layout == "ragged" and method.native
    params = dict(ours.routed_experts.named_parameters(recurse=False))
    assert sorted(params) == ["w13_ragged", "w2_ragged"]
    assert params["w13_ragged"].numel() == 2 * H * sum(WIDTHS) + 32 and params["w2_ragged"].numel() == H * sum(WIDTHS)
    torch.manual_seed(200 + tokens)
    x = torch.randn(tokens, H).to(dtype)
    out, ref = _forward(cfg, ours, x).float(), _forward(cfg, padded, x).float()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # both round the SiLU product and the output to bf16, in different orders
        assert (out - ref).abs().max() <= 2 * 2**-8 * ref.abs().max(), (out - ref).abs().max()


@pytest.fixture(scope="module")
def gpt_oss_layers(layers):
    """gpt-oss's MoE layer (clamped SwiGLU `swigluoai`, expert biases, interleaved gate/up): stock on
    the zero-padded weights (pruned neurons' gate/up rows and biases 0, every down bias kept) and ours
    pruned to WIDTHS, width-0 experts included."""
    from tools.moe_layer import build_layer

    cfg, _ = layers
    torch.manual_seed(1)
    gate_w = torch.randn(E, H) * 0.5
    gate_up, down = torch.randn(E, 2 * I, H) * H**-0.5 * 3, torch.randn(E, H, I) * I**-0.5
    b13, b2 = torch.randn(E, 2 * I), torch.randn(E, H)
    padded_gate_up, padded_down, padded_b13 = gate_up.clone(), down.clone(), b13.clone()
    for e, w in enumerate(WIDTHS):
        padded_gate_up[e, 2 * w :] = 0
        padded_b13[e, 2 * w :] = 0
        padded_down[e, :, w:] = 0
    args = dict(biases=(b13, b2), activation="swigluoai")
    stock = build_layer(cfg, "model.layers.6.mlp", H, E, I, TOP_K, torch.float32, None, (gate_w, gate_up, down), **args)
    padded = build_layer(cfg, "model.layers.7.mlp", H, E, I, TOP_K, torch.float32, None,
                         (gate_w, padded_gate_up, padded_down), biases=(padded_b13, b2), activation="swigluoai")
    full = build_layer(cfg, "model.layers.8.mlp", H, E, I, TOP_K, torch.float32, [I] * E, (gate_w, gate_up, down), **args)
    pruned = build_layer(cfg, "model.layers.9.mlp", H, E, I, TOP_K, torch.float32, WIDTHS, (gate_w, gate_up, down), **args)
    return cfg, stock, padded, full, pruned


@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_gpt_oss_pruned_layer_equals_stock_on_zero_padded_weights(gpt_oss_layers, tokens):
    """Biases and the clamped SwiGLU: the unpruned layer is the stock call (bit-equal); the pruned
    one (buckets, Python op, one-token and batched paths) equals stock on the zero-padded weights,
    width-0 experts adding their router-weighted down bias."""
    cfg, stock, padded, full, pruned = gpt_oss_layers
    method = pruned.routed_experts.quant_method
    assert method.layout == "buckets" and method.bias and method.interleaved and not method.native
    torch.manual_seed(200 + tokens)
    x = torch.randn(tokens, H) * 2
    assert torch.equal(_forward(cfg, full, x), _forward(cfg, stock, x))
    ours, ref = _forward(cfg, pruned, x), _forward(cfg, padded, x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours - _forward(cfg, stock, x)).abs().max() > 1e-2


def test_loader_refuses_wrong_shapes_and_missing_tensors(layers):
    from heapr_serve.errors import HeaprError

    _, built = layers
    routed = built["ours_pruned"].routed_experts
    with pytest.raises(HeaprError, match=r"declares width 32 \(expected \[32, 128\]\)"):
        routed.load_expert(1, 0, torch.zeros(64, H), "model.layers.3.mlp.experts.1.gate_proj.weight")
    with pytest.raises(HeaprError, match="declares expert 2 width 0"):
        routed.load_expert(2, 0, torch.zeros(16, H), "model.layers.3.mlp.experts.2.gate_proj.weight")
    with pytest.raises(HeaprError, match="appears twice"):
        routed.load_expert(0, 0, torch.zeros(64, H), "model.layers.3.mlp.experts.0.gate_proj.weight")
    routed._heapr_loaded.discard((4, 2))
    with pytest.raises(HeaprError, match="down tensor of expert 4 .* is missing"):
        routed.check_complete()


def test_expert_parallel_loader_checks_every_tensor_but_keeps_only_its_own(layers):
    """Under EP the loader still checks another rank's tensors against the declared widths, does not
    write them anywhere, and requires only this rank's experts to be complete."""
    from heapr_serve.errors import HeaprError

    _, built = layers
    routed = built["ours_pruned"].routed_experts
    method = routed.quant_method
    before = {n: p.detach().clone() for n, p in routed.named_parameters(recurse=False)}
    loaded = set(routed._heapr_loaded)
    method.owned = frozenset({0, 1, 2, 3})
    try:
        with pytest.raises(HeaprError, match=r"declares width 64 \(expected \[64, 128\]\)"):
            routed.load_expert(5, 0, torch.zeros(32, H), "model.layers.3.mlp.experts.5.gate_proj.weight")
        routed._heapr_loaded -= {(5, 0), (5, 1), (5, 2)}
        routed.load_expert(5, 0, torch.ones(64, H), "model.layers.3.mlp.experts.5.gate_proj.weight")
        assert all(torch.equal(p, before[n]) for n, p in routed.named_parameters(recurse=False))
        routed.check_complete()  # expert 5's up and down tensors belong to the other rank
        routed._heapr_loaded.discard((1, 2))
        with pytest.raises(HeaprError, match="down tensor of expert 1 .* is missing"):
            routed.check_complete()
    finally:
        method.owned = None
        routed._heapr_loaded = loaded
