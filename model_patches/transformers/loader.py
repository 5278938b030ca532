"""Loading pruned (ragged-width) checkpoints in transformers: `load_pruned` and `RaggedExperts`.

transformers merges per-expert tensors into one `[E, 2I, H]` stack on load, which cannot hold experts
of different widths. For a folder whose config.json has a `heapr` section we build the stock model on
the meta device, swap each routed-experts module for `RaggedExperts` at the declared widths, and load
the tensors ourselves after `validate_checkpoint` has matched every shape against those widths.
Dense folders go to the stock loader untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from heapr_serve.errors import HeaprError
from heapr_serve.families import moe_blocks
from heapr_serve.checkpoint.format import open_safetensors, tensor_layer
from heapr_serve.checkpoint.source import fp32_patterns
from heapr_serve.checkpoint.source import rebuild_non_persistent_buffers
from heapr_serve.checkpoint.validate import validate_checkpoint
from heapr_serve.score.moe_forward import expert_parts, sorted_moe_forward


class _Expert(nn.Module):
    """One routed expert at its own width (names match the per-expert tensors on disk); with `bias`
    (gpt-oss) gate/up/down have biases, and a width-0 expert keeps only its down bias."""

    def __init__(self, hidden: int, width: int, dtype: torch.dtype | None = None, bias: bool = False):
        super().__init__()
        if width == 0:  # gpt-oss: the down bias alone
            self.down_proj = nn.Module()
            self.down_proj.bias = nn.Parameter(torch.empty(hidden, dtype=dtype))
            return
        self.gate_proj = nn.Linear(hidden, width, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(hidden, width, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(width, hidden, bias=bias, dtype=dtype)


class RaggedExperts(nn.Module):
    """Routed experts of a pruned layer, each at its own width; width-0 experts hold no weights."""

    def __init__(self, hidden: int, widths: list[int], act_fn, dtype: torch.dtype | None = None, glu=None, bias: bool = False):
        super().__init__()
        self.num_experts = len(widths)
        self.hidden_dim = hidden
        self.widths = list(widths)
        self.act_fn = act_fn
        self.glu = glu  # gpt-oss's clamped SwiGLU of (gate, up), with `bias`
        self.bias = bias
        # Children named by expert id, so state-dict keys are `{e}.gate_proj.weight` as on disk.
        for e, width in enumerate(widths):
            if width > 0 or bias:
                self.add_module(str(e), _Expert(hidden, width, dtype, bias))

    def weights(self, e: int):
        if self.widths[e] == 0 and not self.bias:
            return None
        expert = getattr(self, str(e))
        if self.widths[e] == 0:  # only the down bias: zero-width views, so the output is the bias
            b = expert.down_proj.bias
            empty = b.new_zeros(0, self.hidden_dim)
            return empty, empty, empty.t(), b.new_zeros(0), b.new_zeros(0), b
        weights = (expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight)
        if self.bias:
            weights += (expert.gate_proj.bias, expert.up_proj.bias, expert.down_proj.bias)
        return weights

    def linears(self, e: int):
        """Expert e's gate/up/down Linear modules (None at width 0): the forward calls them as modules,
        so hooks on them (llm-compressor's GPTQ) see the tokens routed to each expert."""
        if self.widths[e] == 0:
            return None
        expert = getattr(self, str(e))
        return expert.gate_proj, expert.up_proj, expert.down_proj

    def forward(self, hidden_states, top_k_index, top_k_weights):
        weights = self.weights if self.bias else self.linears
        return sorted_moe_forward(
            hidden_states, top_k_index, top_k_weights, weights, self.act_fn, self.num_experts, glu=self.glu
        )


def load_pruned(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"):
    """Load a pruned folder as a transformers model with `RaggedExperts` in its MoE layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = validate_checkpoint(path)
    config = AutoConfig.from_pretrained(path)
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks = moe_blocks(model)
    if sorted(blocks) != sorted(ckpt.widths):
        raise HeaprError(
            f"{path}/config.json: heapr.expert_widths lists layers {sorted(ckpt.widths)} but the model's MoE layers are {sorted(blocks)}"
        )
    for layer, block in blocks.items():
        _, act_fn, glu = expert_parts(block.experts)
        with torch.device("meta"):
            block.experts = RaggedExperts(ckpt.hidden_size, ckpt.widths[layer], act_fn, dtype, glu=glu, bias=glu is not None)

    # Tensors of layers past num_hidden_layers (DeepSeek-V3's MTP layer, kept whole) are not part of
    # the model's forward: transformers ignores them too. What the model keeps in float32 (DeepSeek-V3's
    # e_score_correction_bias) stays float32, as `from_pretrained` would keep it.
    fp32 = fp32_patterns(model, dtype)
    state = {}
    for file in sorted(set(ckpt.tensor_files.values())):
        with open_safetensors(Path(path) / file, device=str(device)) as f:
            for name in f.keys():
                if ckpt.family.is_unserved(name):
                    continue  # a vision tower or MTP module kept in the folder: not part of the causal LM
                layer = tensor_layer(name)
                if layer is not None and layer >= ckpt.num_hidden_layers:
                    continue
                key = ckpt.family.module_tensor_name(name)
                tensor = f.get_tensor(name)
                keep32 = fp32 is not None and tensor.is_floating_point() and fp32.search(key)
                state[key] = tensor.to(torch.float32 if keep32 else dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise HeaprError(f"{path}: tensors do not match the {ckpt.family.architecture} layout ({what})")
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    rebuild_non_persistent_buffers(model, device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise HeaprError(f"{path}: could not materialise {leftover[:3]}; this transformers version is not supported")
    return model.to(device).eval()
