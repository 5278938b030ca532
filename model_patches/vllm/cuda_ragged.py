"""CUDA backend: the ragged Triton kernel (`torch.ops.heapr.ragged_fused_moe`, model_patches.vllm.kernels).

One launch per GEMM over a packed layout of every expert at its exact width; the experts load into
width buckets like every backend's and are packed once after loading. The kernel computes SiLU-and-mul
only and has no expert biases: the layer chooses this backend for pruned SiLU layers on CUDA where
`ragged_op_status` says the kernel is usable.
"""

from __future__ import annotations

import torch

from model_patches.vllm.kernels.ragged_layout import pack_ragged_experts
from model_patches.vllm.ragged_method import HeaprRaggedMoEMethod


def ragged_op_status() -> tuple[bool, str]:
    """(usable, why) of the ragged CUDA kernel. Only a missing import means "absent": any other error
    of the kernel module is a bug that must be seen, not a silent fall back to slower buckets. (Imported
    here, not at the top: Triton may be missing, and that is an answer, not an error.)"""
    try:
        import model_patches.vllm.kernels.ragged_moe_triton  # noqa: F401  (registers heapr::ragged_fused_moe)
        from model_patches.vllm.kernels import ragged_jit
    except ImportError as exc:
        return False, f"the ragged kernel does not import ({exc})"
    if not ragged_jit.HAS_TRITON:
        return False, "Triton is not installed"
    if not hasattr(torch.ops.heapr, "ragged_fused_moe"):
        return False, "the heapr::ragged_fused_moe op is not registered"
    return True, "Triton and the heapr::ragged_fused_moe op are available"


class CudaRaggedMethod(HeaprRaggedMoEMethod):
    """The bucket stacks repacked into the ragged kernel's layout; one op call per forward."""

    backend = "ragged"
    tile = 1  # exact widths: the kernel masks its own tiles

    def process_weights_after_loading(self, layer) -> None:
        packed = pack_ragged_experts(self._bucket_experts(layer), hidden_size=layer.hidden_size)
        self._drop_buckets(layer)
        # module state, not method attributes: sleep mode, weight reload and .to() must see them
        layer.register_parameter("w13_packed", torch.nn.Parameter(packed.w13, requires_grad=False))
        layer.register_parameter("w2t_packed", torch.nn.Parameter(packed.w2t, requires_grad=False))
        for name in ("widths", "w13_offsets", "w2_offsets"):
            layer.register_buffer(f"heapr_packed_{name}", getattr(packed, name), persistent=False)
        self.max_width = packed.max_width

    def forward(self, layer, x, topk_weights, topk_ids):
        return torch.ops.heapr.ragged_fused_moe(
            x, layer.w13_packed, layer.w2t_packed, layer.heapr_packed_widths, layer.heapr_packed_w13_offsets,
            layer.heapr_packed_w2_offsets, topk_ids, topk_weights, self.max_width,
        )
