"""Heterogeneous-width (HEAPr-pruned) routed experts for vLLM: the layer, its backend, its checked loader.

vLLM builds every MoE layer as one `[E, 2I, H]` / `[E, H, I]` stack. A pruned checkpoint gives each
routed expert its own width I_e (0 allowed), so this module replaces only the routed-expert container
(`RoutedExperts`) of the family's stock MoE block; the stock gate, router, shared experts, all-reduce
and `MoERunner` stay as they are, so routing and shared experts are unchanged by construction.

Kernels (design §3, chosen by measurement, see docs/serving.md), one method class per backend, chosen
once per layer by `ragged_method` (which logs the choice and the reason once):

* CPU, pruned SiLU layers on AVX-512 BF16 CPUs: the exact-width *ragged* kernel
  (model_patches.vllm.cpu_ragged): experts load into buckets as below, then are repacked at their
  exact widths (no tile rounding) and the layer is one call.
* CPU otherwise: *width buckets* run by vLLM's own CPU grouped-GEMM kernel (model_patches.vllm.cpu_buckets);
  an unpruned layer is one bucket and runs the stock call unchanged (same speed as stock vLLM).
* CUDA: the ragged Triton kernel (model_patches.vllm.cuda_ragged, one launch per GEMM over a packed
  layout) when it imports; otherwise stock Triton `fused_experts` per bucket with an `expert_map` that
  skips pairs outside the bucket (model_patches.vllm.cuda_buckets).
* Quantized checkpoints: model_patches.vllm.quantized.

Loading checks every expert tensor against `heapr.expert_widths` (and that none is missing), because a
ragged checkpoint loaded by a stock layer is silently wrong. Tensor parallelism splits each expert's
width across ranks (rank r keeps neurons [r*I_e//tp, (r+1)*I_e//tp)). Expert parallelism gives each
rank the whole experts vLLM's `ExpertMapManager` places on it, at their own widths (the other experts
are width 0 there; ids stay global); EPLB and quantised weights are refused with a clear error. The
model classes that use this layer are derived from the family registry in model_patches.vllm.models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.platforms import current_platform

from heapr_serve.errors import HeaprError
from heapr_serve.quantize.layout import QuantSpec
from model_patches.vllm import cpu_python_ops
from model_patches.vllm.base import say_backend
from model_patches.vllm.buckets import owned_widths, rank_share
from model_patches.vllm.cpu_buckets import CpuBucketsMethod
from model_patches.vllm.cpu_ragged import CpuRaggedMethod
from model_patches.vllm.cuda_buckets import CudaBucketsMethod
from model_patches.vllm.cuda_ragged import CudaRaggedMethod, ragged_op_status
from model_patches.vllm.quantized import HeaprQuantizedMoEMethod, check_activation
from model_patches.vllm.ragged_method import HeaprRaggedMoEMethod


def ragged_method(moe: FusedMoEConfig, widths: list[int], layout: str | None = None,
                  owned: list[int] | None = None) -> HeaprRaggedMoEMethod:
    """The unquantized layer's method: its backend chosen once, said once with the reason. `layout`
    forces the CPU layout (None: the kernel where it runs the layer, else the cost model)."""
    act = moe.activation.value
    bias = bool(getattr(moe, "has_bias", False))
    if bias and not current_platform.is_cpu():
        raise HeaprError("pruned experts with biases (gpt-oss) are served on the CPU engine for now; the CUDA "
                         "kernels of the ragged layer have no expert biases yet")
    what = f"routed experts ({act}{', biases' if bias else ''})"
    if current_platform.is_cpu():
        say_backend(what, CpuBucketsMethod.backend, "the CPU engine; its layout is chosen per layer from the widths")
        if layout == "ragged" or (not layout and CpuRaggedMethod.runs(moe)):
            return CpuRaggedMethod(moe, widths, owned=owned)
        return CpuBucketsMethod(moe, widths, layout=layout, owned=owned)
    ragged_ok, why = ragged_op_status() if current_platform.is_cuda() else (False, "not a CUDA platform")
    local = list(widths) if owned is None else owned_widths(widths, owned)
    if len(set(local)) == 1:
        cls, why = CudaBucketsMethod, "all experts one width: one stock fused_experts call"
    elif act != "silu":
        cls, why = CudaBucketsMethod, f"activation {act}: the ragged kernel computes SiLU-and-mul only"
    else:
        cls = CudaRaggedMethod if ragged_ok else CudaBucketsMethod
    say_backend(what, cls.backend, why)
    return cls(moe, widths, owned=owned)


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
        self._heapr_key = cpu_python_ops.register(self, self.layer_name)  # how the CPU Python ops find it

    def _get_quant_method(self, prefix, quant_config, moe_config):
        if quant_config is not None:  # a folder written by `heapr-serve quantize` (checked in QuantSpec)
            if moe_config.moe_parallel_config.use_ep:
                raise HeaprError("expert parallelism is not supported for quantized pruned checkpoints yet; drop --enable-expert-parallel")
            check_activation(moe_config)
            return HeaprQuantizedMoEMethod(moe_config, self.__dict__["_heapr_widths"], QuantSpec.from_quant_config(quant_config))
        if self.expert_map_manager.num_fused_shared_experts:
            raise HeaprError("fused shared experts (ROCm AITER) are not supported for pruned checkpoints")
        owned = self._heapr_owned_experts(prefix, moe_config)
        return ragged_method(moe_config, self.__dict__["_heapr_widths"], layout=self.__dict__["_heapr_layout"], owned=owned)

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
