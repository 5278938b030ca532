"""CPU backend: vLLM's own CPU grouped-GEMM kernel (`cpu_fused_moe`) over width buckets or slices.

A layer's experts are grouped by (per-rank, 32-aligned) width; each bucket is a uniform stack that the
kernel runs. The (token, expert) pairs are sorted by bucket once, each bucket runs on its gathered rows
with ids remapped to the bucket, and one `index_add_` sums the rows back per token. An unpruned layer
is one bucket with identity ids and runs the stock call unchanged (same speed as stock vLLM). Small
layers may instead cut every expert into 32-wide slices and run them all in one kernel call
(`buckets.choose_layout`, the cost model, decides; docs/serving.md).

vLLM compiles the CPU model with fullgraph=True and calls the MoE forward inline, so the data-dependent
dispatch runs inside an opaque op: the native one (model_patches.vllm.cpu_ext, one C++ call, no Python
per step) where it built, else the Python op (model_patches.vllm.cpu_python_ops) calling `run`.
"""

from __future__ import annotations

import torch

from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.utils import replace_parameter, set_weight_attrs
from vllm.platforms import CpuArchEnum, current_platform

from model_patches.vllm import cpu_ext
from model_patches.vllm import cpu_python_ops  # noqa: F401  (registers torch.ops.heapr_serve.cpu_bucketed_moe)
from model_patches.vllm.buckets import choose_layout, plan_slices
from model_patches.vllm.ragged_method import HeaprRaggedMoEMethod


def cpu_isa(dtype: torch.dtype) -> str:
    """The ISA string vLLM's own CPU MoE experts would pick for this machine and dtype. Choosing AMX
    also asks the kernel for this process's AMX permission (without it the first tile instruction is
    SIGILL; stock vLLM relies on oneDNN having asked first)."""
    arch = current_platform.get_cpu_architecture()
    if dtype == torch.bfloat16:
        if arch == CpuArchEnum.X86 and torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx():
            return "amx"
        if arch == CpuArchEnum.ARM:
            return "neon"
        if arch == CpuArchEnum.POWERPC:
            return "vsx"
    return "vec"


class CpuBucketsMethod(HeaprRaggedMoEMethod):
    """Per-bucket (or per-slice) stacks prepacked for vLLM's CPU kernel, one kernel call per bucket."""

    backend = "cpu"
    tile = 32  # the CPU grouped GEMM tiles the intermediate dim by 32

    def __init__(self, moe: FusedMoEConfig, widths: list[int], layout: str | None = None, owned: list[int] | None = None):
        super().__init__(moe, widths, owned)
        # an unpruned layer is the stock call; biased experts (gpt-oss) take the bias-aware path (Python
        # op, vLLM's kernel with the bucket's biases); otherwise the given layout or the cost model's
        if not self.identity and not self.bias:
            self.layout = layout or choose_layout(self.widths, self.tp_size, self.tp_rank, self.tile, moe.hidden_dim,
                                                  moe.experts_per_token)
        self.slices = plan_slices(self.widths, self.tp_size, self.tp_rank, self.tile) if self.layout == "slices" else None
        self.isa = None
        self.native = False  # the C++ op (model_patches.vllm.cpu_ext) is loaded
        self._bucket_lists = None  # (bucket_of, local_of, prepacked stacks) as Python lists, for decode

    def _create_weights(self, layer, hidden_size: int, params_dtype: torch.dtype, extra: dict) -> None:
        if self.layout != "slices":
            return super()._create_weights(layer, hidden_size, params_dtype, extra)
        sl = self.slices  # one stack of every expert's slices
        w13 = torch.nn.Parameter(torch.zeros(sl.size, 2 * sl.width, hidden_size, dtype=params_dtype), requires_grad=False)
        w2 = torch.nn.Parameter(torch.zeros(sl.size, hidden_size, sl.width, dtype=params_dtype), requires_grad=False)
        layer.register_parameter("w13_slices", w13)
        layer.register_parameter("w2_slices", w2)
        set_weight_attrs(w13, extra)
        set_weight_attrs(w2, extra)

    def process_weights_after_loading(self, layer) -> None:
        self._bucket_lists = None
        self.isa = cpu_isa(layer.params_dtype)
        if self.layout == "slices":
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
        for b in range(len(self.buckets)):
            for name in (f"w13_b{b}", f"w2_b{b}"):
                replace_parameter(layer, name, cpu_prepack_moe_weight(getattr(layer, name).data, self.isa))
        if not self.identity:
            # built (first time) and loaded here, at load time, never while Dynamo traces; the
            # native op has no expert biases, so biased experts (gpt-oss) take the Python op
            self.native = cpu_ext.load() and not self.bias
            # module buffers, not method attributes, so that Dynamo sees them as model state
            layer.register_buffer("heapr_bucket_of", self.bucket_of.to(torch.int32), persistent=False)
            layer.register_buffer("heapr_local_of", self.local_of.to(torch.int32), persistent=False)

    def forward(self, layer, x, topk_weights, topk_ids):
        if self.identity:  # unpruned: exactly the stock call (static, so torch.compile traces it)
            return self._stock_call(layer, x, topk_weights, topk_ids)
        if self.layout == "slices":
            return self._apply_slices(layer, x, topk_weights, topk_ids)
        if self.native:
            n = len(self.buckets)
            return torch.ops.heapr_cpu.bucketed_moe(
                x, topk_weights, topk_ids, layer.heapr_bucket_of, layer.heapr_local_of,
                [getattr(layer, f"w13_b{b}") for b in range(n)], [getattr(layer, f"w2_b{b}") for b in range(n)],
                layer.activation.value, self.isa,
            )
        return torch.ops.heapr_serve.cpu_bucketed_moe(x, topk_weights, topk_ids, layer._heapr_key)

    def run(self, layer, x, topk_weights, topk_ids):
        """The Python dispatch (what `torch.ops.heapr_serve.cpu_bucketed_moe` runs)."""
        if self.identity:
            return self._stock_call(layer, x, topk_weights, topk_ids)
        return self._add_down_bias(layer, self._apply_buckets(layer, x, topk_weights, topk_ids), topk_weights, topk_ids)

    # -- kernel calls -----------------------------------------------------------------------------

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

    def _apply_slices(self, layer, x, topk_weights, topk_ids):
        """One vLLM kernel call for the whole layer: each token's top-k experts become its slices."""
        act = layer.activation.value
        if self.native:  # top-k' = the batch's largest slice count (exact at one token)
            return torch.ops.heapr_cpu.sliced_moe(
                x, topk_weights, topk_ids, layer.heapr_slice_start, layer.heapr_slice_count,
                layer.w13_slices, layer.w2_slices, self.slices.zero, act, self.isa,
            )
        # static shapes, so Dynamo traces it into the graph: top-k' = top-k x the largest slice count
        T = topk_ids.shape[0]
        ids = layer.heapr_slice_ids[topk_ids.long()].reshape(T, -1)
        weights = (topk_weights.to(torch.float32).unsqueeze(-1) * layer.heapr_slice_mask[topk_ids.long()]).reshape(T, -1)
        out = torch.empty_like(x)
        cpu_fused_moe(out, x, layer.w13_slices, layer.w2_slices, None, None, weights.contiguous(), ids.contiguous(),
                      act, self.isa, False)
        return out

    def _stock_call(self, layer, x, topk_weights, topk_ids):
        """The unpruned layer: one stack holding every expert in order, exactly stock vLLM's kernel call."""
        out = torch.empty_like(x)
        cpu_fused_moe(out, x, layer.w13_b0, layer.w2_b0, self._w13_bias(layer, 0), self._w2_bias(layer),
                      topk_weights.to(torch.float32), topk_ids.to(torch.int32), layer.activation.value, self.isa, False)
        return out

    def _apply_buckets(self, layer, x, topk_weights, topk_ids):
        """The routed experts' sum over the buckets (down biases, if any, are added by the caller)."""
        act = layer.activation.value
        weights = topk_weights.to(torch.float32)
        num_tokens, top_k = topk_ids.shape
        if num_tokens == 1:
            return self._apply_one_token(layer, x, weights, topk_ids, act)
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

    def _apply_one_token(self, layer, x, weights, topk_ids, act):
        """Decode step of one sequence: group its top-k experts by bucket in Python (no sort, gather
        or scatter); each bucket runs the token with its experts as a smaller top-k."""
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
