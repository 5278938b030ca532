"""gpt-oss MXFP4 folders as OpenAI released them, made from a tiny float gpt-oss, and their float copies.

Layout of the release (and of transformers' converter): each expert stack as `<stack>_blocks` uint8
[E, R, C/32, 16] (two e2m1 values a byte, low nibble first) and `<stack>_scales` uint8 [E, R, C/32]
(e8m0: 2^(s - 127) per 32 values), where [E, R, C] is transformers' stack with its last two axes swapped
(gate_up [E, H, 2I] -> R = 2I, C = H; down [E, I, H] -> R = H, C = I). Everything else (attention,
router, embeddings, head, norms, the expert biases) is bfloat16, which `modules_to_not_convert` says.

The decoder here is written from the format, not from transformers' function, so that the reader under
test (which uses transformers') is checked against an independent one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # magnitudes of nibbles 0-7; bit 3 is the sign
RELEASED_QUANTIZATION = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                    "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
STACK = re.compile(r"^.*layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")


def encode(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' [E, C, R] stack -> (blocks [E, R, C/32, 16], scales [E, R, C/32]): per 32 values the
    smallest power of two that brings the largest magnitude within e2m1's 6, values rounded to nearest."""
    w = stack.float().transpose(1, 2)
    e, r, c = w.shape
    groups = w.reshape(e, r, c // 32, 32)
    amax = groups.abs().amax(-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-127, 127)
    scaled = groups / torch.pow(2.0, exp)[..., None]
    index = (scaled.abs()[..., None] - E2M1).abs().argmin(-1)
    nibbles = (index | ((scaled < 0) & (index > 0)).long() << 3).to(torch.uint8)
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(blocks, scales) -> transformers' float32 stack [E, C, R]: the inverse of `encode` on its grid."""
    lut = torch.cat([E2M1, -E2M1])
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], -1).flatten(-2)  # [E, R, G, 32]
    values = values * torch.pow(2.0, scales.float() - 127)[..., None]
    e, r, g, _ = values.shape
    return values.reshape(e, r, g * 32).transpose(1, 2).contiguous()


def write_mxfp4(source: Path, out: Path) -> Path:
    """An MXFP4 copy of the float gpt-oss folder `source`, in the released layout and config."""
    out.mkdir(parents=True)
    tensors = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(file))
    packed = {}
    for name, t in tensors.items():
        if STACK.match(name):
            packed[name + "_blocks"], packed[name + "_scales"] = encode(t)
        else:
            packed[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
    save_file(packed, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.update(dtype="bfloat16", quantization_config=RELEASED_QUANTIZATION)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_side_files(source, out)
    return out


def write_dequantised(source: Path, out: Path) -> Path:
    """The float (bfloat16) copy of the MXFP4 folder `source`: stacks decoded, no quantization_config,
    as transformers' `Mxfp4Config(dequantize=True)` + `save_pretrained` would leave it."""
    out.mkdir(parents=True)
    tensors = load_file(source / "model.safetensors")
    plain = {}
    for name, t in tensors.items():
        if name.endswith("_blocks"):
            stack = name.removesuffix("_blocks")
            plain[stack] = decode(t, tensors[stack + "_scales"]).to(torch.bfloat16)
        elif not name.endswith("_scales"):
            plain[name] = t
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_side_files(source, out)
    return out


def _copy_side_files(source: Path, out: Path) -> None:
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(item, out / item.name)
