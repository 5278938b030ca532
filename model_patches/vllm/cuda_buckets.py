"""GPU backend without the ragged kernel: stock Triton `fused_experts` once per width bucket.

The layer chooses it where the ragged kernel does not run the layer: every expert one width (one
stock call), an activation other than SiLU, or the kernel unavailable. Each bucket's call gets an
`expert_map` that sends the pairs of experts outside the bucket nowhere, so they add exactly zero.
"""

from __future__ import annotations

import torch

from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

from model_patches.vllm.ragged_method import HeaprRaggedMoEMethod


class CudaBucketsMethod(HeaprRaggedMoEMethod):
    """Per-bucket stacks, one stock `fused_experts` call per bucket."""

    backend = "triton_buckets"
    # stock Triton runs any width, but one call per distinct width would be up to E calls per layer,
    # so the buckets share 16-wide tiles
    tile = 16

    def process_weights_after_loading(self, layer) -> None:
        device = getattr(layer, "w13_b0").device if self.buckets else "cpu"
        maps = []
        for bucket in self.buckets:
            m = torch.full((len(self.widths),), -1, dtype=torch.int32)
            m[list(bucket.experts)] = torch.arange(len(bucket.experts), dtype=torch.int32)
            maps.append(m.to(device))
        self.expert_maps = maps

    def forward(self, layer, x, topk_weights, topk_ids):
        out = None
        for b, m in enumerate(self.expert_maps):
            y = fused_experts(
                x, getattr(layer, f"w13_b{b}"), getattr(layer, f"w2_b{b}"), topk_weights, topk_ids,
                activation=layer.activation, global_num_experts=len(self.widths), expert_map=m,
            )
            out = y if out is None else out.add_(y)
        return out if out is not None else torch.zeros_like(x)
