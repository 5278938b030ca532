"""Build small random MoE models of every supported family, for tests and benchmarks.

Each folder is a normal Hugging Face checkpoint (config, safetensors with per-expert 2-D tensors as
transformers writes them, the project's tokenizer), small enough to load in seconds, with shapes vLLM's
CPU backend accepts (head_dim 64; DeepSeek-V3's MLA with kv_lora_rank + qk_rope_head_dim = 576).

Usage: python tools/build_tiny_models.py OUT_DIR [--family qwen3_moe ...] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
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

CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      intermediate_size=256, norm_topk_prob=True, decoder_sparse_step=1),
    "qwen2_moe": dict(COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      intermediate_size=256, shared_expert_intermediate_size=128, norm_topk_prob=False,
                      decoder_sparse_step=1, qkv_bias=True),
    "mixtral": dict(COMMON, num_local_experts=8, num_experts_per_tok=2, intermediate_size=64),
    "olmoe": dict(COMMON, num_experts=8, num_experts_per_tok=2, intermediate_size=64, num_key_value_heads=2),
    "deepseek_v3": dict(
        {k: v for k, v in COMMON.items() if k != "head_dim"},
        num_hidden_layers=3, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, intermediate_size=256, n_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, topk_method="noaux_tc", routed_scaling_factor=2.5, norm_topk_prob=True,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
        rope_interleave=True,
    ),
}


def tokenizer():
    from tools.make_tokenizer import build_tokenizer

    return build_tokenizer(VOCAB)


def build_tiny_model(family: str, out: Path, seed: int = 0, tok=None, **overrides) -> Path:
    """Write a random `family` model to `out` and return it. `overrides` change config fields."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**CONFIGS[family], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # score-correction bias is zero at init; give routing something to do
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
    model.save_pretrained(out)
    (tok or tokenizer()).save_pretrained(out)
    return Path(out)


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
