"""Real vLLM MoE layers outside a model: the set-up the layer benchmark, the decode benchmark and the
layer tests share (the same `FusedMoEFactory` -> `MoERunner` the models use, the stock gate included).
"""

from __future__ import annotations

import tempfile

import torch


def pruned_widths(num_experts: int, dense: int, ratio: float, align: int, seed: int) -> list[int]:
    """Per-expert widths removing about `ratio` of the neurons, spread unevenly as HEAPr's global
    ranking does (some experts keep most, a few drop to 0), each a multiple of `align`."""
    if ratio <= 0:
        return [dense] * num_experts
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # Beta draws from the global RNG: seed it, leave the caller's state alone
        torch.manual_seed(seed)
        keep = torch.distributions.Beta(torch.tensor(4.0), torch.tensor(4.0 * ratio / (1 - ratio))).sample((num_experts,))
    widths = (keep * dense / align).round().clamp(0, dense // align).long() * align
    target = round((1 - ratio) * num_experts * dense / align) * align
    order = torch.randperm(num_experts, generator=gen).tolist()
    i = 0
    while int(widths.sum()) != target:  # re-balance to the exact target, one block at a time
        e = order[i % num_experts]
        if widths.sum() > target and widths[e] > 0:
            widths[e] -= align
        elif widths.sum() < target and widths[e] < dense:
            widths[e] += align
        i += 1
    return widths.tolist()


def setup_vllm(dtype: torch.dtype, max_tokens: int):
    from vllm.config import CompilationConfig, ParallelConfig, SchedulerConfig, VllmConfig
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from vllm.config import set_current_vllm_config

    cfg = VllmConfig(
        parallel_config=ParallelConfig(),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=max(2048, max_tokens), max_num_seqs=max(256, max_tokens), max_model_len=4096, is_encoder_decoder=False),
        compilation_config=CompilationConfig(),
    )
    if torch.cpu._is_amx_tile_supported():  # as oneDNN does in a server before the stock AMX MoE kernel runs
        torch.cpu._init_amx()
    tmp = tempfile.mkdtemp()
    with set_current_vllm_config(cfg):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{tmp}/dist", backend="gloo")
        initialize_model_parallel(1, 1)
    return cfg


def build_layer(cfg, name: str, hidden: int, experts: int, width: int, top_k: int, dtype, widths=None, weights=None,
                layout: str | None = None, biases=None, activation: str = "silu"):
    """One MoE layer as Qwen3-MoE builds it (gate inside the runner), with given (or random) weights.
    `biases` (w13 [E, 2I], w2 [E, H]) with activation "swigluoai" make it a gpt-oss layer: w13 and its
    bias interleaved (gate j at row 2j, up j at 2j + 1), as vLLM's CPU kernel reads them."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear

    from model_patches.vllm.layer import HeaprRoutedExperts

    torch.set_default_dtype(dtype)
    with set_current_vllm_config(cfg):
        gate = GateLinear(hidden, experts, prefix=f"{name}.gate")
        kwargs = {}
        if widths is not None:
            kwargs = dict(routed_experts_cls=HeaprRoutedExperts, routed_experts_args={"heapr_widths": widths, "heapr_layout": layout})
        runner = FusedMoEFactory(
            gate=gate, num_experts=experts, top_k=top_k, hidden_size=hidden, intermediate_size=width,
            renormalize=True, params_dtype=dtype, prefix=f"{name}.experts", has_bias=biases is not None,
            activation=activation, **kwargs,
        )
    torch.set_default_dtype(torch.float32)
    gate_w, gate_up, down = weights
    gate.weight.data.copy_(gate_w)
    routed = runner.routed_experts
    if widths is None:
        routed.w13_weight.data.copy_(gate_up)
        routed.w2_weight.data.copy_(down)
        if biases is not None:
            routed.w13_bias.data.copy_(biases[0])
            routed.w2_bias.data.copy_(biases[1])
    elif biases is not None:  # interleaved gate/up, per-neuron biases, every expert's down bias
        for e, w in enumerate(widths):
            routed.load_expert(e, 2, biases[1][e], "down bias", "bias")
            if w:
                for proj in (0, 1):
                    routed.load_expert(e, proj, gate_up[e, proj::2][:w], "gate/up")
                    routed.load_expert(e, proj, biases[0][e, proj::2][:w], "gate/up bias", "bias")
                routed.load_expert(e, 2, down[e, :, :w], "down")
        routed.check_complete()
    else:
        for e, w in enumerate(widths):
            if w:
                routed.load_expert(e, 0, gate_up[e, :w], "gate")
                routed.load_expert(e, 1, gate_up[e, width : width + w], "up")
                routed.load_expert(e, 2, down[e, :, :w], "down")
        routed.check_complete()
    for module in (gate, routed):  # as vLLM's loader does after loading (prepacking for the CPU)
        module.quant_method.process_weights_after_loading(module)
    return runner
