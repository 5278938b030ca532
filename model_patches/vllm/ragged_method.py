"""The unquantized routed experts of heterogeneous width: what every backend's method shares.

One method class per backend, each in its own module; the layer (model_patches.vllm.layer) chooses
one per layer, once, and says which and why:

* `cpu_buckets.CpuBucketsMethod`: vLLM's CPU grouped-GEMM kernel over width buckets or slices (an
  unpruned layer is one bucket: the stock call), dispatched natively or by the Python op;
* `cpu_ragged.CpuRaggedMethod`: the exact-width native CPU kernel (AVX-512 BF16);
* `cuda_ragged.CudaRaggedMethod`: the ragged Triton kernel, one launch per GEMM;
* `cuda_buckets.CudaBucketsMethod`: stock Triton `fused_experts` per bucket.

Shared here: the expert-parallel ownership, the tensor-parallel split, gpt-oss's biases and
interleaved gate/up, and the width buckets every backend loads into (the ragged ones repack them
after loading).
"""

from __future__ import annotations

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.utils import set_weight_attrs

from heapr_serve.errors import HeaprError
from model_patches.vllm.base import HeaprMoEMethodBase
from model_patches.vllm.buckets import owned_widths, plan_buckets, rank_widths


class HeaprRaggedMoEMethod(HeaprMoEMethodBase):
    """Creates per-bucket weight stacks for the loader; each backend prepacks and runs them."""

    backend: str  # the name the logs give this backend
    tile: int  # bucket widths round up to this many neurons (the kernel's tile; 1 = exact widths)

    def __init__(self, moe: FusedMoEConfig, widths: list[int], owned: list[int] | None = None):
        super().__init__(moe)
        # expert parallelism: `owned` = this rank's (global) experts; the plans below see every other
        # expert as width 0, so topk ids stay global and a foreign expert adds exactly zero here
        self.owned = None if owned is None else frozenset(owned)
        self.widths = list(widths) if owned is None else owned_widths(widths, owned)
        par = moe.moe_parallel_config
        self.tp_size, self.tp_rank = par.tp_size, par.tp_rank
        # gpt-oss: gate/up biases per neuron, a down bias per expert, and vLLM's clamped SwiGLU
        # ("swigluoai"), whose kernels take gate and up interleaved (row 2j gate j, row 2j+1 up j)
        self.bias = bool(getattr(moe, "has_bias", False))
        self.interleaved = moe.activation.value == "swigluoai"
        self.buckets = plan_buckets(self.widths, self.tp_size, self.tp_rank, self.tile)
        self.rank_widths = rank_widths(self.widths, self.tp_size, self.tp_rank, self.tile)
        E = len(self.widths)
        # one bucket holding every expert in order, unpadded: the stock call, no remapping at all
        self.identity = len(self.buckets) == 1 and self.buckets[0].experts == tuple(range(E))
        self.layout = "buckets"
        bucket_of = torch.full((E,), -1, dtype=torch.int64)
        local_of = torch.zeros(E, dtype=torch.int64)
        for b, bucket in enumerate(self.buckets):
            for i, e in enumerate(bucket.experts):
                bucket_of[e], local_of[e] = b, i
        self.bucket_of, self.local_of = bucket_of, local_of

    def owns(self, expert: int) -> bool:
        """Whether this rank holds `expert` (always, without expert parallelism)."""
        return self.owned is None or expert in self.owned

    def w13_rows(self, proj: int, lo: int, hi: int, padded: int) -> slice:
        """Rows of a w13 stack of `padded` neurons that hold gate (proj 0) or up (1) neurons lo..hi of
        this rank's share: gate rows then up rows, or interleaved for the clamped SwiGLU."""
        if self.interleaved:
            return slice(2 * lo + proj, 2 * hi + proj, 2)
        return slice(proj * padded + lo, proj * padded + hi)

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
        local = len(self.widths) if self.owned is None else len(self.owned)
        if num_experts != local:
            raise HeaprError(f"{layer.layer_name}: {num_experts} local experts but {local} expected from heapr.expert_widths")
        extra.pop("weight_loader", None)
        self._create_weights(layer, hidden_size, params_dtype, extra)

    def _create_weights(self, layer, hidden_size: int, params_dtype: torch.dtype, extra: dict) -> None:
        """One zero-filled (w13, w2) stack per bucket, plus gpt-oss's biases."""
        for b, bucket in enumerate(self.buckets):
            n = len(bucket.experts)
            # zeros, not empty: padding rows/columns must be exact zeros
            w13 = torch.nn.Parameter(torch.zeros(n, 2 * bucket.width, hidden_size, dtype=params_dtype), requires_grad=False)
            w2 = torch.nn.Parameter(torch.zeros(n, hidden_size, bucket.width, dtype=params_dtype), requires_grad=False)
            layer.register_parameter(f"w13_b{b}", w13)
            layer.register_parameter(f"w2_b{b}", w2)
            set_weight_attrs(w13, extra)
            set_weight_attrs(w2, extra)
            if self.bias:  # zero-padded neurons get bias 0: clamped SwiGLU(0, 0) = 0, exact
                bias = torch.nn.Parameter(torch.zeros(n, 2 * bucket.width, dtype=params_dtype), requires_grad=False)
                layer.register_parameter(f"w13_bias_b{b}", bias)
        if self.bias:
            # every expert's down bias, width-0 experts' too (they still add router weight x bias), added
            # outside the kernel: sum_j w[t, j] * b2[id[t, j]]; under TP only rank 0 holds it (the
            # output is all-reduced), under EP only the expert's owner
            down = torch.nn.Parameter(torch.zeros(len(self.widths), hidden_size, dtype=params_dtype), requires_grad=False)
            layer.register_parameter("heapr_down_bias", down)

    def _bucket_experts(self, layer) -> list:
        """Each expert's (gate [n, H], up [n, H], down [H, n]) views in its load-time bucket, at this
        rank's width n; None for width 0. What the packed layouts are built from."""
        experts = []
        for e, rw in enumerate(self.rank_widths):
            if rw == 0:
                experts.append(None)
                continue
            b, i = int(self.bucket_of[e]), int(self.local_of[e])
            w13, w2 = getattr(layer, f"w13_b{b}").data[i], getattr(layer, f"w2_b{b}").data[i]
            width = self.buckets[b].width
            experts.append((w13[:rw], w13[width:width + rw], w2[:, :rw]))
        return experts

    def _drop_buckets(self, layer) -> None:
        """A packed copy replaces the bucket stacks."""
        for b in range(len(self.buckets)):
            del layer._parameters[f"w13_b{b}"]
            del layer._parameters[f"w2_b{b}"]
