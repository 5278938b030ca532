"""CPU backend: the exact-width ragged kernel (`torch.ops.heapr_cpu.ragged_moe`, csrc/ragged_moe_avx512.cpp).

The default for pruned SiLU layers on CPUs with AVX-512 BF16 (measured faster than vLLM's kernel at
every size, docs/serving.md). Experts load into width buckets like every backend's, then are repacked
at their exact widths (model_patches.vllm.ragged_pack: no tile rounding) and the layer is one native
call. Where the layer is unpruned or has biases, or the kernel does not build here, the method is
exactly `CpuBucketsMethod`: vLLM's kernel on the load-time buckets.
"""

from __future__ import annotations

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig

from model_patches.vllm import cpu_ext
from model_patches.vllm.cpu_buckets import CpuBucketsMethod, cpu_isa
from model_patches.vllm.ragged_pack import pack_experts


class CpuRaggedMethod(CpuBucketsMethod):
    """`CpuBucketsMethod` with the layout "ragged": the exact-width packed experts, one kernel call."""

    def __init__(self, moe: FusedMoEConfig, widths: list[int], owned: list[int] | None = None):
        super().__init__(moe, widths, layout="ragged", owned=owned)

    @staticmethod
    def runs(moe: FusedMoEConfig) -> bool:
        """The exact-width kernel runs this layer: SiLU experts without biases, hidden a multiple of
        16, bf16 or fp32, on a CPU with AVX-512 BF16; else vLLM's kernel over buckets or slices."""
        return (moe.activation.value == "silu" and moe.hidden_dim % 16 == 0
                and moe.in_dtype in (torch.bfloat16, torch.float32) and cpu_ext.cpu_has_ragged_isa())

    def process_weights_after_loading(self, layer) -> None:
        if self.layout == "ragged":
            self.isa = cpu_isa(layer.params_dtype)  # as vLLM's kernel would: this asks for AMX permission too
            if self._pack(layer):
                return
            self.layout = "buckets"  # the kernel did not build here: vLLM's kernel on the load-time buckets
        super().process_weights_after_loading(layer)

    def _pack(self, layer) -> bool:
        """Replace the load-time bucket stacks by the exact-width packed layout of the ragged kernel
        (each expert at this rank's width, no tile rounding); False when the kernel is unavailable."""
        if layer.params_dtype not in (torch.bfloat16, torch.float32) or not cpu_ext.load_ragged():
            return False
        packed = pack_experts(self._bucket_experts(layer), layer.hidden_size, layer.params_dtype)
        self._drop_buckets(layer)
        # module state, not method attributes: sleep mode, weight reload and .to() must see them
        layer.register_parameter("w13_ragged", torch.nn.Parameter(packed.w13, requires_grad=False))
        layer.register_parameter("w2_ragged", torch.nn.Parameter(packed.w2, requires_grad=False))
        for name in ("widths", "w13_off", "w2_off"):
            layer.register_buffer(f"heapr_ragged_{name}", getattr(packed, name), persistent=False)
        self.max_width = packed.max_width
        self.native = True
        return True

    def forward(self, layer, x, topk_weights, topk_ids):
        if self.layout != "ragged":
            return super().forward(layer, x, topk_weights, topk_ids)
        return torch.ops.heapr_cpu.ragged_moe(  # one call of the exact-width kernel for the whole layer
            x, topk_weights, topk_ids, layer.heapr_ragged_widths, layer.heapr_ragged_w13_off,
            layer.heapr_ragged_w2_off, layer.w13_ragged, layer.w2_ragged, self.max_width,
        )
