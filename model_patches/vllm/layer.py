"""Heterogeneous-width (HEAPr-pruned) routed experts for vLLM.

vLLM builds every MoE layer as one `[E, 2I, H]` / `[E, H, I]` stack. A pruned checkpoint gives each
routed expert its own width I_e (0 allowed), so this module replaces only the routed-expert container
(`RoutedExperts`) of the family's stock MoE block; the stock gate, router, shared experts, all-reduce
and `MoERunner` stay as they are, so routing and shared experts are unchanged by construction.

Kernels (design §3, chosen by measurement, see docs/serving.md):

* CPU, pruned SiLU layers on AVX-512 BF16 CPUs: the exact-width *ragged* kernel
  (`torch.ops.heapr_cpu.ragged_moe`, csrc/ragged_moe_avx512.cpp): experts load into buckets as below,
  then are repacked at their exact widths (no tile rounding) and the layer is one call.
* CPU otherwise: *width buckets*. A layer's experts are grouped by (per-rank, aligned) width; each bucket is a
  uniform stack that vLLM's own CPU grouped-GEMM kernel (`cpu_fused_moe`) runs. The (token, expert)
  pairs are sorted by bucket once, each bucket runs on its gathered rows with ids remapped to the bucket,
  and one `index_add_` sums the rows back per token. An unpruned layer is one bucket with identity ids
  and runs the stock call unchanged (same speed as stock vLLM).
* CUDA: the ragged Triton kernel (`torch.ops.heapr.ragged_fused_moe`, one launch per GEMM over a packed
  layout) when it imports; otherwise stock Triton `fused_experts` per bucket with an `expert_map` that
  skips pairs outside the bucket.

Loading checks every expert tensor against `heapr.expert_widths` (and that none is missing), because a
ragged checkpoint loaded by a stock layer is silently wrong. Tensor parallelism splits each expert's
width across ranks (rank r keeps neurons [r*I_e//tp, (r+1)*I_e//tp)). Expert parallelism gives each
rank the whole experts vLLM's `ExpertMapManager` places on it, at their own widths (the other experts
are width 0 there; ids stay global); EPLB and quantised weights are refused with a clear error. The
model classes that use this layer are derived from the family registry in model_patches.vllm.models.
"""

from __future__ import annotations

import itertools
import re
import weakref
from collections.abc import Iterable

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from heapr_serve.errors import HeaprError
from model_patches.vllm.buckets import choose_layout, owned_widths, plan_buckets, plan_slices, rank_share, rank_widths


# ------------------------------------------------------------------------------------------------
# The method: weights per bucket and the forward
# ------------------------------------------------------------------------------------------------


def _cpu_isa(dtype: torch.dtype) -> str:
    """The ISA string vLLM's own CPU MoE experts would pick for this machine and dtype. Choosing AMX
    also asks the kernel for this process's AMX permission (without it the first tile instruction is
    SIGILL; stock vLLM relies on oneDNN having asked first)."""
    from vllm.platforms import CpuArchEnum

    arch = current_platform.get_cpu_architecture()
    if dtype == torch.bfloat16:
        if arch == CpuArchEnum.X86 and torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx():
            return "amx"
        if arch == CpuArchEnum.ARM:
            return "neon"
        if arch == CpuArchEnum.POWERPC:
            return "vsx"
    return "vec"


def ragged_op_status() -> tuple[bool, str]:
    """(usable, why) of the ragged CUDA kernel. Only a missing import means "absent": any other error
    of the kernel module is a bug that must be seen, not a silent fall back to slower buckets."""
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


def say_backend(what: str, backend: str, why: str) -> None:
    """Once per layer type (vLLM's info_once keys on the message): which kernel runs, and why."""
    from vllm.logger import init_logger

    init_logger("vllm.heapr_serve").info_once("heapr-serve: %s: backend %s (%s)", what, backend, why)


class HeaprMoEMethodBase(FusedMoEMethodBase):
    """What every heapr-serve experts method answers vLLM alike: modular, no EPLB, and no quant
    config for vLLM's kernels (the method runs its own buckets)."""

    @property
    def supports_eplb(self) -> bool:
        return False

    @property
    def is_monolithic(self) -> bool:
        return False

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig | None:
        return FusedMoEQuantConfig.make()


class HeaprRaggedMoEMethod(HeaprMoEMethodBase):
    """Creates per-bucket weight stacks, prepacks them for the platform kernel, runs the buckets."""

    def __init__(self, moe: FusedMoEConfig, widths: list[int], backend: str | None = None, layout: str | None = None,
                 owned: list[int] | None = None):
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
        if self.bias and not current_platform.is_cpu():
            raise HeaprError("pruned experts with biases (gpt-oss) are served on the CPU engine for now; the CUDA "
                             "kernels of the ragged layer have no expert biases yet")
        why = "chosen by the caller"
        if backend is None:
            ragged_ok, ragged_why = ragged_op_status() if current_platform.is_cuda() else (False, "not a CUDA platform")
            if current_platform.is_cpu():
                backend, why = "cpu", "the CPU engine; its layout is chosen per layer from the widths"
            elif len(set(self.widths)) == 1:
                backend, why = "triton_buckets", "all experts one width: one stock fused_experts call"
            elif moe.activation.value != "silu":
                backend, why = "triton_buckets", f"activation {moe.activation.value}: the ragged kernel computes SiLU-and-mul only"
            elif ragged_ok:
                backend, why = "ragged", ragged_why
            else:
                backend, why = "triton_buckets", ragged_why
        self.backend = backend
        say_backend(f"routed experts ({moe.activation.value}{', biases' if self.bias else ''})", backend, why)
        # CPU grouped GEMM tiles the intermediate dim by 32; stock Triton buckets run any width, but
        # one call per distinct width would be up to E calls per layer, so they share 16-wide tiles
        self.tile = 32 if backend == "cpu" else 16 if backend == "triton_buckets" else 1
        self.buckets = plan_buckets(self.widths, self.tp_size, self.tp_rank, self.tile)
        self.rank_widths = rank_widths(self.widths, self.tp_size, self.tp_rank, self.tile)
        E = len(self.widths)
        # one bucket holding every expert in order, unpadded: the stock call, no remapping at all
        self.identity = len(self.buckets) == 1 and self.buckets[0].experts == tuple(range(E))
        self.layout = "buckets"
        if backend == "cpu" and not self.identity and self.bias:
            self.layout = "buckets"  # the bias-aware path (Python op, vLLM's kernel with the bucket's biases)
        elif backend == "cpu" and not self.identity:
            self.layout = layout or ("ragged" if self._ragged_eligible(moe) else choose_layout(
                self.widths, self.tp_size, self.tp_rank, self.tile, moe.hidden_dim, moe.experts_per_token))
        self.slices = plan_slices(self.widths, self.tp_size, self.tp_rank, self.tile) if self.layout == "slices" else None
        bucket_of = torch.full((E,), -1, dtype=torch.int64)
        local_of = torch.zeros(E, dtype=torch.int64)
        for b, bucket in enumerate(self.buckets):
            for i, e in enumerate(bucket.experts):
                bucket_of[e], local_of[e] = b, i
        self.bucket_of, self.local_of = bucket_of, local_of
        self.isa = None
        self.native = False  # the C++ op (model_patches.vllm.cpu_ext) is loaded
        self._bucket_lists = None  # (bucket_of, local_of, prepacked stacks) as Python lists, for decode

    @staticmethod
    def _ragged_eligible(moe: FusedMoEConfig) -> bool:
        """The exact-width kernel (csrc/ragged_moe_avx512.cpp) runs this layer: SiLU experts without
        biases, hidden a multiple of 16, bf16 or fp32, on a CPU with AVX-512 BF16 (measured faster than
        vLLM's kernel at every size, docs/serving.md); else vLLM's kernel over buckets or slices."""
        from model_patches.vllm import cpu_ext

        return (moe.activation.value == "silu" and moe.hidden_dim % 16 == 0
                and moe.in_dtype in (torch.bfloat16, torch.float32) and cpu_ext.cpu_has_ragged_isa())

    def owns(self, expert: int) -> bool:
        """Whether this rank holds `expert` (always, without expert parallelism)."""
        return self.owned is None or expert in self.owned

    def w13_rows(self, proj: int, lo: int, hi: int, padded: int) -> slice:
        """Rows of a w13 stack of `padded` neurons that hold gate (proj 0) or up (1) neurons lo..hi of
        this rank's share: gate rows then up rows, or interleaved for the clamped SwiGLU."""
        if self.interleaved:
            return slice(2 * lo + proj, 2 * hi + proj, 2)
        return slice(proj * padded + lo, proj * padded + hi)

    # -- vLLM method interface --------------------------------------------------------------------

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
        local = len(self.widths) if self.owned is None else len(self.owned)
        if num_experts != local:
            raise HeaprError(f"{layer.layer_name}: {num_experts} local experts but {local} expected from heapr.expert_widths")
        extra.pop("weight_loader", None)
        if self.layout == "slices":  # one stack of every expert's slices
            sl = self.slices
            w13 = torch.nn.Parameter(torch.zeros(sl.size, 2 * sl.width, hidden_size, dtype=params_dtype), requires_grad=False)
            w2 = torch.nn.Parameter(torch.zeros(sl.size, hidden_size, sl.width, dtype=params_dtype), requires_grad=False)
            layer.register_parameter("w13_slices", w13)
            layer.register_parameter("w2_slices", w2)
            set_weight_attrs(w13, extra)
            set_weight_attrs(w2, extra)
            return
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

    def process_weights_after_loading(self, layer) -> None:
        self._bucket_lists = None
        if self.backend == "cpu":
            from vllm._custom_ops import cpu_prepack_moe_weight
            from vllm.model_executor.utils import replace_parameter

            self.isa = _cpu_isa(layer.params_dtype)
            if self.layout == "slices":
                from model_patches.vllm import cpu_ext

                for name in ("w13_slices", "w2_slices"):
                    replace_parameter(layer, name, cpu_prepack_moe_weight(getattr(layer, name).data, self.isa))
                self.native = cpu_ext.load()
                sl = self.slices
                # expert -> its slice ids (the static-shape Python path), padded with its own first
                # slice at weight 0 (an expert of width 0: slice `zero`, weight 0)
                width = max(1, sl.max_count)
                table = torch.full((len(self.widths), width), sl.zero, dtype=torch.int32)
                mask = torch.zeros(len(self.widths), width, dtype=torch.float32)
                for e, (st, c) in enumerate(zip(sl.start, sl.count)):
                    if c:
                        table[e] = st
                        table[e, :c] = torch.arange(st, st + c, dtype=torch.int32)
                        mask[e, :c] = 1.0
                layer.register_buffer("heapr_slice_ids", table, persistent=False)
                layer.register_buffer("heapr_slice_mask", mask, persistent=False)
                layer.register_buffer("heapr_slice_start", torch.tensor(sl.start, dtype=torch.int32), persistent=False)
                layer.register_buffer("heapr_slice_count", torch.tensor(sl.count, dtype=torch.int32), persistent=False)
                return
            if self.layout == "ragged":
                if self._pack_ragged(layer):
                    return
                self.layout = "buckets"  # the kernel did not build here: vLLM's kernel on the load-time buckets
            for b in range(len(self.buckets)):
                for name in (f"w13_b{b}", f"w2_b{b}"):
                    replace_parameter(layer, name, cpu_prepack_moe_weight(getattr(layer, name).data, self.isa))
            if not self.identity:
                from model_patches.vllm import cpu_ext

                # built (first time) and loaded here, at load time, never while Dynamo traces; the
                # native op has no expert biases, so biased experts (gpt-oss) take the Python op
                self.native = cpu_ext.load() and not self.bias
                # module buffers, not method attributes, so that Dynamo sees them as model state
                layer.register_buffer("heapr_bucket_of", self.bucket_of.to(torch.int32), persistent=False)
                layer.register_buffer("heapr_local_of", self.local_of.to(torch.int32), persistent=False)
        elif self.backend == "ragged":
            from model_patches.vllm.kernels.ragged_layout import pack_ragged_experts

            packed = pack_ragged_experts(self._bucket_experts(layer), hidden_size=layer.hidden_size)
            self._drop_buckets(layer)
            # module state, not method attributes: sleep mode, weight reload and .to() must see them
            layer.register_parameter("w13_packed", torch.nn.Parameter(packed.w13, requires_grad=False))
            layer.register_parameter("w2t_packed", torch.nn.Parameter(packed.w2t, requires_grad=False))
            for name in ("widths", "w13_offsets", "w2_offsets"):
                layer.register_buffer(f"heapr_packed_{name}", getattr(packed, name), persistent=False)
            self.max_width = packed.max_width
        else:
            device = getattr(layer, "w13_b0").device if self.buckets else "cpu"
            maps = []
            for bucket in self.buckets:
                m = torch.full((len(self.widths),), -1, dtype=torch.int32)
                m[list(bucket.experts)] = torch.arange(len(bucket.experts), dtype=torch.int32)
                maps.append(m.to(device))
            self.expert_maps = maps

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

    def _pack_ragged(self, layer) -> bool:
        """Replace the load-time bucket stacks by the exact-width packed layout of the ragged kernel
        (each expert at this rank's width, no tile rounding); False when the kernel is unavailable."""
        from model_patches.vllm import cpu_ext
        from model_patches.vllm.ragged_pack import pack_experts

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

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        if layer.apply_router_weight_on_input:
            raise HeaprError("apply_router_weight_on_input is not supported by heapr-serve's ragged experts")
        if self.backend == "cpu":
            if self.identity:  # unpruned: exactly the stock call (static, so torch.compile traces it)
                return self._stock_call(layer, x, topk_weights, topk_ids)
            # vLLM compiles the CPU model with fullgraph=True and calls the MoE forward inline, so the
            # data-dependent bucket dispatch runs inside an opaque op: native (one C++ call, no Python
            # per step) when it built, else the Python custom op
            if self.layout == "ragged":  # one call of the exact-width kernel for the whole layer
                return torch.ops.heapr_cpu.ragged_moe(
                    x, topk_weights, topk_ids, layer.heapr_ragged_widths, layer.heapr_ragged_w13_off,
                    layer.heapr_ragged_w2_off, layer.w13_ragged, layer.w2_ragged, self.max_width,
                )
            if self.layout == "slices":
                return self._apply_cpu_slices(layer, x, topk_weights, topk_ids)
            if self.native:
                n = len(self.buckets)
                return torch.ops.heapr_cpu.bucketed_moe(
                    x, topk_weights, topk_ids, layer.heapr_bucket_of, layer.heapr_local_of,
                    [getattr(layer, f"w13_b{b}") for b in range(n)], [getattr(layer, f"w2_b{b}") for b in range(n)],
                    layer.activation.value, self.isa,
                )
            return torch.ops.heapr_serve.cpu_bucketed_moe(x, topk_weights, topk_ids, layer._heapr_key)
        if self.backend == "ragged":
            return torch.ops.heapr.ragged_fused_moe(
                x, layer.w13_packed, layer.w2t_packed, layer.heapr_packed_widths, layer.heapr_packed_w13_offsets,
                layer.heapr_packed_w2_offsets, topk_ids, topk_weights, self.max_width,
            )
        return self._apply_triton_buckets(layer, x, topk_weights, topk_ids)

    # -- kernels ----------------------------------------------------------------------------------

    def _w13_bias(self, layer, b: int):
        return getattr(layer, f"w13_bias_b{b}") if self.bias else None

    def _w2_bias(self, layer):
        """The unpruned layer's down biases, for the stock call (every expert in the one stack, in order)."""
        return layer.heapr_down_bias if self.bias else None

    def _add_down_bias(self, layer, out: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """out + sum_j w[t, j] * down_bias[id[t, j]] (experts with biases only; static shapes)."""
        if not self.bias:
            return out
        b2 = layer.heapr_down_bias.to(torch.float32)[topk_ids.long()]  # [T, k, H]
        return (out.to(torch.float32) + (topk_weights.to(torch.float32).unsqueeze(-1) * b2).sum(1)).to(out.dtype)

    def _apply_cpu_slices(self, layer, x, topk_weights, topk_ids):
        """One vLLM kernel call for the whole layer: each token's top-k experts become its slices."""
        act = layer.activation.value
        if self.native:  # top-k' = the batch's largest slice count (exact at one token)
            return torch.ops.heapr_cpu.sliced_moe(
                x, topk_weights, topk_ids, layer.heapr_slice_start, layer.heapr_slice_count,
                layer.w13_slices, layer.w2_slices, self.slices.zero, act, self.isa,
            )
        # static shapes, so Dynamo traces it into the graph: top-k' = top-k x the largest slice count
        from vllm._custom_ops import cpu_fused_moe

        T = topk_ids.shape[0]
        ids = layer.heapr_slice_ids[topk_ids.long()].reshape(T, -1)
        weights = (topk_weights.to(torch.float32).unsqueeze(-1) * layer.heapr_slice_mask[topk_ids.long()]).reshape(T, -1)
        out = torch.empty_like(x)
        cpu_fused_moe(out, x, layer.w13_slices, layer.w2_slices, None, None, weights.contiguous(), ids.contiguous(),
                      act, self.isa, False)
        return out

    def _stock_call(self, layer, x, topk_weights, topk_ids):
        """The unpruned layer: one stack holding every expert in order, exactly stock vLLM's kernel call."""
        from vllm._custom_ops import cpu_fused_moe

        out = torch.empty_like(x)
        cpu_fused_moe(out, x, layer.w13_b0, layer.w2_b0, self._w13_bias(layer, 0), self._w2_bias(layer),
                      topk_weights.to(torch.float32), topk_ids.to(torch.int32), layer.activation.value, self.isa, False)
        return out

    def _apply_cpu(self, layer, x, topk_weights, topk_ids):
        if self.identity:
            return self._stock_call(layer, x, topk_weights, topk_ids)
        return self._add_down_bias(layer, self._apply_cpu_buckets(layer, x, topk_weights, topk_ids), topk_weights, topk_ids)

    def _apply_cpu_buckets(self, layer, x, topk_weights, topk_ids):
        """The routed experts' sum over the buckets (down biases, if any, are added by the caller)."""
        from vllm._custom_ops import cpu_fused_moe

        act = layer.activation.value
        weights = topk_weights.to(torch.float32)
        num_tokens, top_k = topk_ids.shape
        if num_tokens == 1:
            return self._apply_cpu_one_token(layer, x, weights, topk_ids, act)
        flat = topk_ids.reshape(-1).long()
        bucket = self.bucket_of[flat]  # -1: width-0 expert, contributes exactly zero
        order = torch.argsort(bucket, stable=True)
        counts = torch.bincount(bucket + 1, minlength=len(self.buckets) + 1).tolist()
        skip = counts[0]
        kept = order[skip:]
        if kept.numel() == 0:
            return torch.zeros_like(x)
        token = kept // top_k
        rows = x.index_select(0, token)
        local = self.local_of[flat[kept]].to(torch.int32).unsqueeze(1)
        w = weights.reshape(-1)[kept].unsqueeze(1).contiguous()
        y = torch.empty_like(rows)
        start = 0
        for b, count in enumerate(counts[1:]):
            if count == 0:
                continue
            s = slice(start, start + count)
            cpu_fused_moe(
                y[s], rows[s], getattr(layer, f"w13_b{b}"), getattr(layer, f"w2_b{b}"), self._w13_bias(layer, b), None,
                w[s], local[s].contiguous(), act, self.isa, False,
            )
            start += count
        out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32)
        out.index_add_(0, token, y.to(torch.float32))
        return out.to(x.dtype)

    def _apply_cpu_one_token(self, layer, x, weights, topk_ids, act):
        """Decode step of one sequence: group its top-k experts by bucket in Python (no sort, gather
        or scatter); each bucket runs the token with its experts as a smaller top-k."""
        from vllm._custom_ops import cpu_fused_moe

        if self._bucket_lists is None:
            self._bucket_lists = (self.bucket_of.tolist(), self.local_of.tolist(),
                                  [(getattr(layer, f"w13_b{b}"), getattr(layer, f"w2_b{b}"), self._w13_bias(layer, b))
                                   for b in range(len(self.buckets))])
        bucket_of, local_of, stacks = self._bucket_lists
        groups: dict[int, list[int]] = {}
        ids = topk_ids[0].tolist()
        for j, e in enumerate(ids):
            if bucket_of[e] >= 0:  # width-0 experts contribute exactly zero
                groups.setdefault(bucket_of[e], []).append(j)
        acc = None
        for b, js in groups.items():
            local = torch.tensor([[local_of[ids[j]] for j in js]], dtype=torch.int32)
            y = torch.empty_like(x)
            cpu_fused_moe(y, x, stacks[b][0], stacks[b][1], stacks[b][2], None, weights[:, js], local, act, self.isa, False)
            acc = y.to(torch.float32) if acc is None else acc.add_(y)
        return torch.zeros_like(x) if acc is None else acc.to(x.dtype)

    def _apply_triton_buckets(self, layer, x, topk_weights, topk_ids):
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

        out = None
        for b, m in enumerate(self.expert_maps):
            y = fused_experts(
                x, getattr(layer, f"w13_b{b}"), getattr(layer, f"w2_b{b}"), topk_weights, topk_ids,
                activation=layer.activation, global_num_experts=len(self.widths), expert_map=m,
            )
            out = y if out is None else out.add_(y)
        return out if out is not None else torch.zeros_like(x)


_LAYER_IDS = itertools.count()
_CPU_LAYERS: "weakref.WeakValueDictionary[str, HeaprRoutedExperts]" = weakref.WeakValueDictionary()


def _cpu_bucketed_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    """Routed-expert output of the named pruned layer on CPU (width buckets, stock CPU kernel); the
    Python fallback of the native op. `layer_name` is the layer's per-instance key."""
    layer = _CPU_LAYERS[layer_name]
    return layer.quant_method._apply_cpu(layer, x, topk_weights, topk_ids)


def _cpu_bucketed_moe_fake(x, topk_weights, topk_ids, layer_name):
    return torch.empty_like(x)


def _cpu_quantized_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    """Routed-expert output of the named quantized pruned layer (model_patches.vllm.quantized)."""
    layer = _CPU_LAYERS[layer_name]
    return layer.quant_method.run(layer, x, topk_weights, topk_ids)


# registered the way vLLM registers its own ops: torch.library.custom_op's Python dispatch costs
# ~0.1 ms a call, a few percent of a decode-sized MoE layer
_LIB = torch.library.Library("heapr_serve", "FRAGMENT")
if current_platform.is_cpu():
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("cpu_bucketed_moe", _cpu_bucketed_moe, mutates_args=[],
                              fake_impl=_cpu_bucketed_moe_fake, target_lib=_LIB)
    direct_register_custom_op("cpu_quantized_moe", _cpu_quantized_moe, mutates_args=[],
                              fake_impl=_cpu_bucketed_moe_fake, target_lib=_LIB)


# ------------------------------------------------------------------------------------------------
# The routed-experts container and its checked loader
# ------------------------------------------------------------------------------------------------


class HeaprRoutedExperts(RoutedExperts):
    """`RoutedExperts` whose experts have the widths declared in config.json (checked at load)."""

    def __init__(self, *args, heapr_widths: list[int], heapr_files: dict | None = None,
                 heapr_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 heapr_layout: str | None = None, **kwargs):
        # set before nn.Module.__init__ runs: _get_quant_method (called by super) needs them
        self.__dict__["_heapr_widths"] = list(heapr_widths)
        self.__dict__["_heapr_layout"] = heapr_layout  # None: the cost model decides (tests force one)
        super().__init__(*args, **kwargs)
        self.heapr_widths = list(heapr_widths)
        self.heapr_files = heapr_files or {}
        self.heapr_projs = {name: i for i, name in enumerate(heapr_projs)}  # the family's on-disk names
        self._heapr_loaded: set[tuple[int, int]] = set()
        # unique per instance: layer names repeat across models in one process
        self._heapr_key = f"{self.layer_name}#{next(_LAYER_IDS)}"
        _CPU_LAYERS[self._heapr_key] = self

    def _get_quant_method(self, prefix, quant_config, moe_config):
        if quant_config is not None:  # a folder written by `heapr-serve quantize` (checked in QuantSpec)
            from model_patches.vllm.quantized import HeaprQuantizedMoEMethod, QuantSpec, check_activation

            if moe_config.moe_parallel_config.use_ep:
                raise HeaprError("expert parallelism is not supported for quantized pruned checkpoints yet; drop --enable-expert-parallel")
            check_activation(moe_config)
            return HeaprQuantizedMoEMethod(moe_config, self.__dict__["_heapr_widths"], QuantSpec.from_quant_config(quant_config))
        if self.expert_map_manager.num_fused_shared_experts:
            raise HeaprError("fused shared experts (ROCm AITER) are not supported for pruned checkpoints")
        owned = self._heapr_owned_experts(prefix, moe_config)
        return HeaprRaggedMoEMethod(moe_config, self.__dict__["_heapr_widths"], layout=self.__dict__["_heapr_layout"],
                                    owned=owned)

    def _heapr_owned_experts(self, prefix, moe_config) -> list[int] | None:
        """Expert parallelism: the global ids of the experts vLLM's own placement (`expert_map`,
        linear or round-robin) gives this rank, so routing and placement are stock; None without EP.

        Only EP over the tensor-parallel group is implemented (every rank sees every token and the
        MoE output is all-reduced, as for TP). Across data-parallel / context-parallel ranks vLLM
        moves tokens between ranks with all2all prepare/finalize kernels, which this method does not
        implement."""
        par = moe_config.moe_parallel_config
        if not par.use_ep:
            return None
        if par.use_all2all_kernels:
            raise HeaprError(
                f"{prefix}: expert parallelism across data/context-parallel ranks (all2all backend "
                f"{par.all2all_backend}) is not supported for pruned checkpoints; use --enable-expert-parallel "
                "with --tensor-parallel-size only"
            )
        expert_map = self.expert_map_manager.expert_map
        return [int(e) for e in torch.nonzero(expert_map >= 0).flatten()]

    @property
    def method(self) -> HeaprRaggedMoEMethod:
        return self.quant_method

    def get_expert_weights(self):
        """EPLB moves and replicates experts between ranks as slices of uniform [E, 2I, H] stacks;
        pruned experts have their own widths and live in width buckets, so there is nothing uniform
        to move."""
        raise HeaprError(
            "EPLB (--enable-eplb) is not supported for pruned checkpoints: it moves experts between ranks as "
            "uniform-width stacks and pruned experts have their own widths; drop --enable-eplb "
            "(--enable-expert-parallel alone works)"
        )

    def _where(self, name: str) -> str:
        file = self.heapr_files.get(name)
        return f"{file}: " if file else ""

    @property
    def quantized(self) -> bool:
        return getattr(self.quant_method, "spec", None) is not None

    def load_expert(self, expert: int, proj: int, tensor: torch.Tensor, name: str, part: str = "weight") -> None:
        """Copy one on-disk expert tensor (proj 0 gate [I_e,H], 1 up [I_e,H], 2 down [H,I_e]) into its
        bucket, after checking it against the declared width. Raises HeaprError naming the tensor."""
        where = self._where(name)
        if expert >= len(self.heapr_widths):
            raise HeaprError(f"{where}tensor {name} names expert {expert}, beyond the {len(self.heapr_widths)} declared")
        width = self.heapr_widths[expert]
        if width == 0 and not (part == "bias" and proj == 2):  # a width-0 gpt-oss expert keeps its down bias
            raise HeaprError(f"{where}tensor {name} exists but heapr.expert_widths declares expert {expert} width 0")
        if self.quantized:
            if (expert, proj, part) in self._heapr_loaded:
                raise HeaprError(f"{where}tensor {name} appears twice in the checkpoint")
            self._heapr_loaded.add((expert, proj, part))
            self.quant_method.load_part(self, expert, proj, part, tensor, where, name)
            return
        if part == "bias":
            return self._load_bias(expert, proj, tensor, name, where)
        if part != "weight":
            raise HeaprError(f"{where}tensor {name} is a quantized tensor, but config.json has no quantization_config; "
                             "the folder is inconsistent, re-run `heapr-serve quantize`")
        H = self.hidden_size
        expected = (H, width) if proj == 2 else (width, H)
        if tuple(tensor.shape) != expected:
            raise HeaprError(
                f"{where}tensor {name} has shape {list(tensor.shape)} but heapr.expert_widths declares width "
                f"{width} (expected {list(expected)}); the checkpoint is inconsistent, re-run `heapr-serve apply`"
            )
        if (expert, proj) in self._heapr_loaded:
            raise HeaprError(f"{where}tensor {name} appears twice in the checkpoint")
        self._heapr_loaded.add((expert, proj))
        method = self.method
        if not method.owns(expert):  # expert parallelism: another rank's expert, checked but not kept
            return
        lo, hi = rank_share(width, method.tp_size, method.tp_rank, method.tile)
        if hi == lo:
            return
        if method.layout == "slices":  # neuron j of this rank's share -> slice start + j // c, row j % c
            sl = method.slices
            c = sl.width
            for j in range(0, hi - lo, c):
                n = min(c, hi - lo - j)
                s = sl.start[expert] + j // c
                if proj == 2:
                    self.w2_slices.data[s, :, :n].copy_(tensor[:, lo + j : lo + j + n])
                else:
                    offset = 0 if proj == 0 else c
                    self.w13_slices.data[s, offset : offset + n].copy_(tensor[lo + j : lo + j + n])
            return
        b, i = int(method.bucket_of[expert]), int(method.local_of[expert])
        if not hasattr(self, f"w13_b{b}"):
            raise HeaprError(f"{where}tensor {name}: this layer's experts are already packed for the kernel; reloading "
                             "weights into a loaded pruned model is not supported, start a new server")
        padded = method.buckets[b].width
        if proj == 2:
            getattr(self, f"w2_b{b}").data[i, :, : hi - lo].copy_(tensor[:, lo:hi])
        else:
            getattr(self, f"w13_b{b}").data[i, method.w13_rows(proj, 0, hi - lo, padded)].copy_(tensor[lo:hi])

    def _load_bias(self, expert: int, proj: int, tensor: torch.Tensor, name: str, where: str) -> None:
        """gpt-oss: a gate / up bias [width] or a down bias [hidden] (every expert, width 0 too), checked."""
        method = self.method
        if not method.bias:
            raise HeaprError(f"{where}tensor {name} is an expert bias, but this model's experts have none; "
                             "the folder is inconsistent, re-run `heapr-serve apply`")
        width = self.heapr_widths[expert]
        expected = (self.hidden_size,) if proj == 2 else (width,)
        if tuple(tensor.shape) != expected:
            raise HeaprError(f"{where}tensor {name} has shape {list(tensor.shape)} but heapr.expert_widths declares width "
                             f"{width} (expected {list(expected)}); the checkpoint is inconsistent, re-run `heapr-serve apply`")
        if (expert, proj, "bias") in self._heapr_loaded:
            raise HeaprError(f"{where}tensor {name} appears twice in the checkpoint")
        self._heapr_loaded.add((expert, proj, "bias"))
        if not method.owns(expert):
            return
        if proj == 2:  # added once: by TP rank 0 (the MoE output is all-reduced)
            if method.tp_rank == 0:
                self.heapr_down_bias.data[expert].copy_(tensor)
            return
        lo, hi = rank_share(width, method.tp_size, method.tp_rank, method.tile)
        if hi == lo:
            return
        b, i = int(method.bucket_of[expert]), int(method.local_of[expert])
        rows = method.w13_rows(proj, 0, hi - lo, method.buckets[b].width)
        getattr(self, f"w13_bias_b{b}").data[i, rows].copy_(tensor[lo:hi])

    def check_complete(self) -> None:
        """After loading: every expert of nonzero width that this rank holds got its three tensors (each with all its
        quantized parts when quantized)."""
        if self.quantized:
            parts = self.quant_method.required_parts()
            for e, w in enumerate(self.heapr_widths):
                for proj in range(3):
                    for part in parts:
                        if w and (e, proj, part) not in self._heapr_loaded:
                            kind = ("gate", "up", "down")[proj]
                            raise HeaprError(f"{self.layer_name}: the {kind} {part} tensor of expert {e} (declared width {w}) "
                                             "is missing from the checkpoint; re-run `heapr-serve quantize`")
            return
        for e, w in enumerate(self.heapr_widths):
            for proj in range(3):
                if w and self.method.owns(e) and (e, proj) not in self._heapr_loaded:
                    kind = ("gate", "up", "down")[proj]
                    raise HeaprError(
                        f"{self.layer_name}: the {kind} tensor of expert {e} (declared width {w}) is missing from the checkpoint"
                    )
                if self.method.bias and (w or proj == 2) and self.method.owns(e) and (e, proj, "bias") not in self._heapr_loaded:
                    kind = ("gate", "up", "down")[proj]
                    raise HeaprError(f"{self.layer_name}: the {kind} bias of expert {e} (declared width {w}) is missing from "
                                     "the checkpoint (gpt-oss experts keep their biases)")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[str]:
        """Per-expert names relative to this layer (`{e}.gate_proj.weight`), as MoERunner passes them."""
        for name, tensor in weights:
            m = re.match(r"^(\d+)\.(\w+)\.(weight(?:_packed|_scale|_shape|_zero_point)?|bias)$", name)
            if not m or m[2] not in self.heapr_projs:
                raise HeaprError(f"{self.layer_name}: unexpected routed-expert tensor {name}")
            self.load_expert(int(m[1]), self.heapr_projs[m[2]], tensor, f"{self.layer_name}.{name}", m[3])
        yield from (n for n, _ in self.named_parameters(recurse=False))
