"""Build small random MoE models of every supported family, for tests and benchmarks.

Each folder is a normal Hugging Face checkpoint (config, safetensors with per-expert 2-D tensors as
transformers writes them, the project's tokenizer), small enough to load in seconds, with shapes vLLM's
CPU backend accepts (head_dim 64; DeepSeek-V3's MLA with kv_lora_rank + qk_rope_head_dim = 576).

Options make the layouts real checkpoints have (`build_tiny_model(..., mtp_layers=1, fp8_block=(128, 128),
fused_experts=True, shard_bytes=1 << 20)`):

- `mtp_layers`: DeepSeek-V3's multi-token-prediction layers `model.layers.{num_hidden_layers + i}.*` (a
  full MoE decoder layer plus embed_tokens, enorm, hnorm, eh_proj, shared_head.norm/.head), declared by
  `num_nextn_predict_layers`; transformers and vLLM's main model ignore them;
- `fp8_block`: FP8 e4m3 block quantisation as DeepSeek-V3 / Qwen3-FP8 ship it: every linear weight
  (not embeddings, heads, norms, routers) as float8_e4m3fn plus a float32 `weight_scale_inv`
  [ceil(out/b0), ceil(in/b1)] (partial edge blocks where a width is not a multiple of the block),
  everything else bfloat16 but `e_score_correction_bias` (float32), and the `quantization_config`;
- `fused_experts`: routed experts on disk as `experts.gate_up_proj [E, 2I, H]` / `experts.down_proj [E, H, I]`;
- `shard_bytes`: several safetensors shards with an index (FP8 scales all in the last shards, away
  from their weights, so readers must look them up across files).

Usage: python tools/build_tiny_models.py OUT_DIR [--family qwen3_moe ...] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 4096

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    eos_token_id=0,
    pad_token_id=0,
    bos_token_id=None,
)

# DeepSeek-V2 and V3 share MLA attention (kv_lora_rank + qk_rope_head_dim = 576, as vLLM's CPU MLA
# needs), shared experts, a dense first layer and grouped routing; they differ in how routes are chosen
_DEEPSEEK = dict(
    {k: v for k, v in COMMON.items() if k != "head_dim"},
    num_hidden_layers=3, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=64, intermediate_size=256, n_shared_experts=1, first_k_dense_replace=1,
    n_group=2, topk_group=1, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
)

# Qwen3-Next / Qwen3.5-MoE: 2 Gated DeltaNet layers then 1 full-attention layer (head_dim 64 on both)
_HYBRID = dict(COMMON, num_hidden_layers=3, full_attention_interval=3, num_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=64, shared_expert_intermediate_size=128, linear_conv_kernel_dim=4,
               linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=2, linear_num_value_heads=2,
               intermediate_size=256, partial_rotary_factor=0.5)

CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      intermediate_size=256, norm_topk_prob=True, decoder_sparse_step=1),
    "qwen2_moe": dict(COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      intermediate_size=256, shared_expert_intermediate_size=128, norm_topk_prob=False,
                      decoder_sparse_step=1, qkv_bias=True),
    "mixtral": dict(COMMON, num_local_experts=8, num_experts_per_tok=2, intermediate_size=64),
    "olmoe": dict(COMMON, num_experts=8, num_experts_per_tok=2, intermediate_size=64, num_key_value_heads=2),
    "deepseek_v3": dict(_DEEPSEEK, topk_method="noaux_tc", routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True),
    "deepseek_v2": dict(_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=2.0, norm_topk_prob=False),
    "glm4_moe": dict(COMMON, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                     intermediate_size=256, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                     routed_scaling_factor=2.5, norm_topk_prob=True, partial_rotary_factor=0.5, use_qk_norm=True,
                     attention_bias=True, num_nextn_predict_layers=0),
    "ernie4_5_moe": dict(COMMON, num_hidden_layers=3, moe_num_experts=8, moe_k=2, moe_intermediate_size=64,
                         intermediate_size=256, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2,
                         moe_layer_interval=1),
    # scoring_func / use_routing_bias / rotary_dim: fields of the released config.json that vLLM reads
    # hybrid linear attention: Gated DeltaNet layers (linear_*) with one full-attention layer in every
    # full_attention_interval; a shared expert with a sigmoid gate; partial RoPE
    "qwen3_next": dict(_HYBRID, decoder_sparse_step=1, norm_topk_prob=True),
    # a vision-language checkpoint as Qwen3.5-MoE ships (these are its text_config; VISION below)
    "qwen3_5_moe": dict(_HYBRID),
    # expert biases, clamped SwiGLU, interleaved gate/up stack [E, H, 2I]; sliding-window + full attention, sinks
    "gpt_oss": dict(COMMON, num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, sliding_window=16,
                    swiglu_limit=7.0, rope_parameters=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=128,
                                                           rope_theta=150000.0, beta_fast=32.0, beta_slow=1.0, truncate=False)),
    "minimax_m2": dict(COMMON, num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, rotary_dim=32,
                       scoring_func="sigmoid", use_routing_bias=True),
}


# families whose checkpoints are vision-language models: built with a one-block vision tower, so the
# folder has the released layout (`model.language_model.*`, `model.visual.*`, config `text_config`)
VISION = {"qwen3_5_moe": dict(depth=1, hidden_size=64, intermediate_size=64, num_heads=1, out_hidden_size=128)}

# score-correction bias spread: ERNIE adds it to softmax probabilities (~1/E), the others to sigmoids
BIAS_STD = {"ernie4_5_moe": 0.01}


def tokenizer():
    from tools.make_tokenizer import build_tokenizer

    return build_tokenizer(VOCAB)


def build_tiny_model(family: str, out: Path, seed: int = 0, tok=None, *, mtp_layers: int | None = None,
                     fp8_block: tuple[int, int] | None = None, fused_experts: bool = False,
                     shard_bytes: int | None = None, bias_std: float | None = None, **overrides) -> Path:
    """Write a random `family` model to `out` and return it. `overrides` change config fields; the
    keyword options (module docstring) give it the on-disk layouts of real checkpoints; `bias_std` the
    spread of the random score-correction biases (0: all zero)."""
    torch.manual_seed(seed)
    fields = {**CONFIGS[family], **overrides}
    if mtp_layers is not None:
        fields["num_nextn_predict_layers"] = mtp_layers
    if family in VISION:
        from transformers import AutoModelForImageTextToText

        config = AutoConfig.for_model(family, text_config=fields, vision_config=VISION[family],
                                      tie_word_embeddings=fields["tie_word_embeddings"])
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    else:
        config = AutoConfig.for_model(family, **fields)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # score-correction biases (and some routers) are zero at init; give routing something to do
        std = getattr(config.get_text_config(), "initializer_range", 0.02)
        for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("e_score_correction_bias"):
                tensor.normal_(0, BIAS_STD.get(family, 0.1) if bias_std is None else bias_std)
            elif name.endswith("gate.weight") and not tensor.any():
                tensor.normal_(0, std)
            elif name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):  # gpt-oss: zero at init
                tensor.normal_(0, std)
    out = Path(out)
    model.save_pretrained(out)
    (tok or tokenizer()).save_pretrained(out)
    if not (mtp_layers or fp8_block or fused_experts or shard_bytes):
        return out

    tensors = {}
    for file in sorted(out.glob("model*.safetensors")):
        tensors.update(load_file(file))
        file.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    saved = json.loads((out / "config.json").read_text())
    if mtp_layers:
        tensors.update(mtp_tensors(tensors, saved, mtp_layers, seed))
    if fused_experts:
        tensors = fuse_experts(tensors)
    if fp8_block:
        tensors = quantize_checkpoint(tensors, fp8_block)
        saved["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": list(fp8_block)}
        saved["dtype"] = "bfloat16"
    save_shards(tensors, out, shard_bytes)
    (out / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    return out


def mtp_tensors(tensors: dict[str, torch.Tensor], config: dict, count: int, seed: int) -> dict[str, torch.Tensor]:
    """DeepSeek-V3's MTP layers: layer `num_hidden_layers + i` is a random MoE decoder layer shaped like
    the last one, plus the MTP parts (embed_tokens, enorm, hnorm, eh_proj, shared_head)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    base, hidden, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    last = f"model.layers.{base - 1}."
    new = {}
    for i in range(count):
        layer = f"model.layers.{base + i}."
        for name, t in tensors.items():
            if not name.startswith(last):
                continue
            if "norm" in name:
                value = 1 + 0.1 * torch.randn(t.shape, generator=gen)
            else:
                value = torch.randn(t.shape, generator=gen) * (float(t.float().std()) or 0.1)
            new[layer + name[len(last):]] = value.to(t.dtype)
        new[layer + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        for part in ("enorm", "hnorm", "shared_head.norm"):
            new[f"{layer}{part}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=gen)
        new[layer + "eh_proj.weight"] = 0.02 * torch.randn(hidden, 2 * hidden, generator=gen)
        new[layer + "shared_head.head.weight"] = 0.02 * torch.randn(vocab, hidden, generator=gen)
    return new


_PER_EXPERT = re.compile(r"^(?P<owner>.*layers\.\d+\.[a-z_]+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down -> `experts.gate_up_proj [E, 2I, H]` and `experts.down_proj [E, H, I]`."""
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    out = {}
    for name, t in tensors.items():
        m = _PER_EXPERT.match(name)
        if m:
            groups.setdefault(m["owner"], {}).setdefault(m["proj"], {})[int(m["expert"])] = t
        else:
            out[name] = t
    for owner, projs in groups.items():
        experts = sorted(projs["gate_proj"])
        out[f"{owner}.gate_up_proj"] = torch.stack([torch.cat([projs["gate_proj"][e], projs["up_proj"][e]]) for e in experts])
        out[f"{owner}.down_proj"] = torch.stack([projs["down_proj"][e] for e in experts])
    return out


FP8_MAX = 448.0  # largest float8_e4m3fn


def quantize_fp8_block(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv [..., ceil(rows/b0), ceil(cols/b1)]) with
    weight ~= fp8 * scale_inv per block, as DeepSeek-V3's FP8 checkpoints store it."""
    rows, cols = weight.shape[-2:]
    r, c = -(-rows // block[0]), -(-cols // block[1])
    padded = F.pad(weight.float(), (0, c * block[1] - cols, 0, r * block[0] - rows))
    tiles = padded.reshape(*weight.shape[:-2], r, block[0], c, block[1])
    scale = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(padded.shape)[..., :rows, :cols].contiguous(), scale.float()


_NOT_QUANTISED = ("embed_tokens", "lm_head", "shared_head.head", "norm", ".mlp.gate.weight", "shared_expert_gate")


def quantize_checkpoint(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Every linear weight (2-D `.weight`, or a fused expert stack) to FP8 with block scales; the rest
    bfloat16, but `e_score_correction_bias`, which DeepSeek-V3 ships in float32."""
    out = {}
    for name, t in tensors.items():
        linear = (t.dim() == 2 and name.endswith(".weight")) or name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        if linear and not any(part in name for part in _NOT_QUANTISED):
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(t, block)
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        else:
            out[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
    return out


def save_shards(tensors: dict[str, torch.Tensor], out: Path, shard_bytes: int | None) -> None:
    """`model.safetensors`, or shards of about `shard_bytes` with an index; FP8 scales go last, so most
    sit in another shard than their weights."""
    names = sorted(n for n in tensors if not n.endswith("_scale_inv")) + sorted(n for n in tensors if n.endswith("_scale_inv"))
    if not shard_bytes:
        save_file({n: tensors[n].contiguous() for n in names}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], [], 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tok = tokenizer()
    for family in args.family:
        path = build_tiny_model(family, args.out / f"tiny-{family}", args.seed, tok)
        print(f"{family}: {path}")


if __name__ == "__main__":
    main()
