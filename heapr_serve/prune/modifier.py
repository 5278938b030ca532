"""HEAPr inside llm-compressor recipes: `HEAPrPruningModifier` (attach -> calibrate -> prune -> finalize).

    from heapr_serve.prune.modifier import HEAPrPruningModifier
    oneshot(model, dataset=ds, recipe=[HEAPrPruningModifier(ratio=0.25, align=16),
                                       GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups=...)],
            moe_calibrate_all_experts=False)
    model.save_pretrained(out)   # a folder `heapr-serve serve` loads

Why it calibrates when it is initialised: HEAPr ranks every atomic expert of every layer against the
others with gradients of the dense model (a forward and a backward pass), while llm-compressor's
pipelines run forward only, layer by layer, compressing each layer as they reach it. So the modifier
runs heapr-serve's own calibration pass over oneshot's calibration set (`state.data.calib`) before any
later modifier attaches to the Linear modules, plans with the same code as `heapr-serve compress`
(the same widths for the same tokens), and cuts each of llm-compressor's linearised experts to its
width. GPTQ then calibrates the pruned experts, each on its own routed tokens, at its own width. The
whole model is resident during the scoring pass; for a model that does not fit, compress with
`heapr-serve compress --streamed` and give llm-compressor the pruned folder (docs/quality.md).
Runs where llmcompressor installs (`bash tools/setup.sh --llmcompressor`: .venv-llmc).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from llmcompressor.core import State
from llmcompressor.modifiers import Modifier
from pydantic import PrivateAttr, model_validator
from torch import nn

from heapr_serve.calibrate.datasets import CalibrationSet
from heapr_serve.checkpoint.format import FORMAT_VERSION
from heapr_serve.checkpoint.validate import validate_checkpoint
from heapr_serve.errors import HeaprError
from heapr_serve.families import family_for, moe_blocks
from heapr_serve.prune.methods import plan_for_method, plan_record
from heapr_serve.prune.options import PruneOptions
from heapr_serve.score.calibration_pass import collect_statistics
from heapr_serve.score.moe_forward import is_linearised

__all__ = ["HEAPrPruningModifier"]


class _NoNeurons(nn.Module):
    """An expert pruned to width 0: it adds nothing and holds no weights, so no quantizer targets it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class HEAPrPruningModifier(Modifier):
    """Removes the `ratio` of routed-expert neurons with the lowest HEAPr scores (or a baseline `method`),
    ranked across all layers (`scope="global"`) or within each; kept widths are multiples of `align`
    (set it to the quantization group size). `batch_size` is the scoring pass's, as compress's."""

    requires_calibration_data: bool = True

    ratio: float
    method: str = "heapr"
    scope: str = "global"
    align: int = 1
    keep_unrouted: bool = False
    batch_size: int = 8
    seed: int = 0

    _record: dict | None = PrivateAttr(default=None)

    def _prune_options(self) -> PruneOptions:
        return PruneOptions(self.ratio, self.method, self.scope, self.align, self.keep_unrouted, self.seed)

    @model_validator(mode="after")
    def _check(self) -> "HEAPrPruningModifier":
        try:
            self._prune_options()
        except HeaprError as err:
            raise ValueError(str(err).replace("--", "")) from None
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {self.batch_size})")
        return self

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        blocks = moe_blocks(model)
        for layer, block in blocks.items():
            experts = block.experts
            if not is_linearised(experts) or getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
                raise HeaprError(f"layer {layer}: HEAPrPruningModifier prunes llm-compressor's linearised experts with a gate "
                                 f"and no biases, not {type(experts).__name__}; prune this family with `heapr-serve compress`")
        calibration = _calibration_set(state.data.calib)
        pad_id = getattr(model.config, "pad_token_id", None) or 0
        batches = list(calibration.batches(self.batch_size, pad_id))
        source_params = sum(p.numel() for p in model.parameters())
        stats = collect_statistics(model, batches, float(self.batch_size * calibration.seq_len))
        source = Path(str(getattr(model.config, "_name_or_path", "") or "."))
        options = self._prune_options()
        plan = plan_for_method(stats, source, options)
        for layer, block in blocks.items():
            _cut(block.experts, plan.keep[layer])
        self._record = {
            "format_version": FORMAT_VERSION,
            **plan_record(plan, options),
            "source_architectures": list(getattr(model.config, "architectures", None) or [type(model).__name__]),
            "source_model": str(source),
            "calibration": {**calibration.describe(), "batch_size": self.batch_size},
            "source_params": source_params,
            "pruned_by": "HEAPrPruningModifier (llm-compressor)",
        }
        return True

    def on_finalize(self, state: State, **kwargs) -> bool:
        """Declare the widths in the config (and what quantized them), and make `save_pretrained` write
        them into config.json: llm-compressor re-saves the source's config.json with only the fields it
        knows, and a ragged folder without them would load into stock vLLM and serve garbage."""
        record = dict(self._record or {})
        quantization = _quantization_record(state.model)
        if quantization is not None:
            record["quantization"] = quantization
        state.model.config.heapr = record
        _declare_widths_on_save(state.model, record)
        return True


def _calibration_set(calib) -> CalibrationSet:
    """oneshot's calibration batches as heapr-serve samples (padding dropped, order kept)."""
    if calib is None:
        raise HeaprError("HEAPrPruningModifier needs calibration data: pass dataset= (and num_calibration_samples=) to oneshot")
    samples = []
    for batch in calib:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        ids = torch.as_tensor(ids).reshape(-1, torch.as_tensor(ids).shape[-1])
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        samples += [row[m.bool()].cpu() for row, m in zip(ids, mask)]
    samples = [s for s in samples if len(s) > 1]
    if not samples:
        raise HeaprError("HEAPrPruningModifier: the calibration set has no sequence of two or more tokens")
    return CalibrationSet(samples, "llm-compressor oneshot dataset", max(len(s) for s in samples))


@torch.no_grad()
def _cut(experts: nn.ModuleList, keep: list[torch.Tensor]) -> None:
    """Cut each linearised expert to its kept neurons: rows of gate/up, columns of down."""
    for e, kept in enumerate(keep):
        expert = experts[e]
        if len(kept) == 0:
            experts[e] = _NoNeurons()
            continue
        idx = kept.to(expert.down_proj.weight.device)
        expert.gate_proj = _linear(expert.gate_proj.weight[idx])
        expert.up_proj = _linear(expert.up_proj.weight[idx])
        expert.down_proj = _linear(expert.down_proj.weight[:, idx])
        expert.intermediate_size = len(kept)


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    return layer


def _declare_widths_on_save(model: nn.Module, record: dict) -> None:
    """Wrap the model's `save_pretrained` (llm-compressor's compressing one): after it has written the
    folder, add the `heapr` section to config.json (atomically) and check the folder as `serve` will."""
    save = model.save_pretrained

    @functools.wraps(save)
    def save_pretrained(save_directory, *args, **kwargs):
        save(save_directory, *args, **kwargs)
        config_file = Path(save_directory) / "config.json"
        config = json.loads(config_file.read_text())
        config["heapr"] = record
        config["architectures"] = [family_for(config).pruned_architecture]  # so vLLM loads it through heapr-serve
        partial = config_file.with_name(".config.json.partial")
        partial.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(partial, config_file)
        validate_checkpoint(save_directory)

    save_pretrained._overridden = True  # llm-compressor wraps an unwrapped save_pretrained again
    model.save_pretrained = save_pretrained


def _quantization_record(model: nn.Module) -> dict | None:
    """What quantized the experts (the scheme compressed-tensors attached to them), or None."""
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and ".experts." in name and scheme.weights is not None:
            w = scheme.weights
            return {"written_by": "llm-compressor", "num_bits": w.num_bits, "type": str(getattr(w.type, "value", w.type)),
                    "strategy": str(getattr(w.strategy, "value", w.strategy)), "group_size": w.group_size,
                    "symmetric": w.symmetric}
    return None
