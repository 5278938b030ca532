"""Make pruned (ragged-width) checkpoints by slicing a tiny model's per-expert tensors.

Independent of `heapr-serve compress` on purpose: the serving tests then check the vLLM side against
docs/checkpoint_format.md directly, with widths we choose (0, unaligned, full) rather than scored ones.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from heapr_serve.checkpoint.format import num_routed_experts, text_view
from heapr_serve.families import family_for

_EXPERT = re.compile(r"^(?P<prefix>.*layers\.)(?P<layer>\d+)\.(?P<block>[a-z_]+)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


def _all_tensors(src: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        if file.name != "heapr_scores.safetensors":
            tensors.update(load_file(file))
    return tensors


def _gpt_oss_ragged(tensors, widths_for_layer, num_experts, dense, gen, widths):
    """gpt-oss: per-expert tensors with their biases from the fused stacks (heapr_serve.score.gpt_oss's
    `fused_slices`, what `compress` writes); a width-0 expert keeps only its down bias."""
    from heapr_serve.checkpoint.format import GPT_OSS_EXPERTS_TENSOR
    from heapr_serve.score.gpt_oss import fused_slices

    stacks = {n: GPT_OSS_EXPERTS_TENSOR.match(n) for n in tensors}
    layers = sorted({int(m["layer"]) for m in stacks.values() if m})
    new = {n: t for n, t in tensors.items() if not stacks[n]}
    keep = {}
    for layer in layers:
        ws = list(widths_for_layer(layer, num_experts, dense))
        widths[str(layer)] = ws
        keep[layer] = [torch.randperm(dense, generator=gen)[:w].sort().values for w in ws]
    for name, m in stacks.items():
        if not m:
            continue
        layer, kind = int(m["layer"]), m["kind"] + (m["bias"] or "")
        for e, kept in enumerate(keep[layer]):
            if len(kept) == 0 and kind != "down_proj_bias":
                continue
            for proj, piece in fused_slices(kind, tensors[name], e, kept).items():
                new[f"{m['prefix']}{layer}.mlp.experts.{e}.{proj}"] = piece.contiguous()
    return layers, new


def make_ragged(src: Path, out: Path, widths_for_layer, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Write `out`: `src` with expert e of layer l cut to `widths_for_layer(l, num_experts, dense)[e]`
    neurons (a random subset kept in original order, as HEAPr keeps them)."""
    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    family = family_for(config)
    tensors = _all_tensors(src)
    gen = torch.Generator().manual_seed(seed)
    num_experts = num_routed_experts(config)
    dense = int(text_view(config).get("moe_intermediate_size") or text_view(config)["intermediate_size"])
    gate_n, up_n, down_n = family.disk_projs
    widths = {}
    if family.expert_layout == "gpt_oss":  # fused stacks with biases on disk: cut as the writer does
        layers, new = _gpt_oss_ragged(tensors, widths_for_layer, num_experts, dense, gen, widths)
    else:
        layers = sorted({int(m["layer"]) for n in tensors if (m := _EXPERT.match(n))})
        new = {n: t for n, t in tensors.items() if not _EXPERT.match(n)}
    for layer in layers if family.expert_layout != "gpt_oss" else ():
        ws = list(widths_for_layer(layer, num_experts, dense))
        widths[str(layer)] = ws
        for e, w in enumerate(ws):
            keep = torch.randperm(dense, generator=gen)[:w].sort().values
            for proj in (gate_n, up_n, down_n):
                name = next(n for n in tensors if (m := _EXPERT.match(n)) and int(m["layer"]) == layer
                            and int(m["expert"]) == e and m["proj"] == proj)
                if w == 0:
                    continue
                t = tensors[name]
                new[name] = (t[:, keep] if proj == down_n else t[keep]).contiguous()
    if dtype is not None:
        new = {n: t.to(dtype) if t.is_floating_point() else t for n, t in new.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    total = sum(len(v) for v in widths.values()) * dense
    kept = sum(sum(v) for v in widths.values())
    config["architectures"] = ["Heapr" + family.architecture]
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    config["heapr"] = {
        "format_version": 1, "method": "heapr", "source_architectures": [family.architecture],
        "source_model": str(src), "dense_width": dense, "expert_widths": widths,
        "ratio": round(1 - kept / total, 4), "effective_ratio": round(1 - kept / total, 4),
        "align": 1, "scope": "test", "calibration": None,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    return out


def mixed_widths(layer: int, num_experts: int, dense: int) -> list[int]:
    """A layer pattern with every case: full, aligned, unaligned, width 0."""
    pattern = [dense, dense // 2, 0, (3 * dense) // 4, 16, dense, dense // 4 + 8, 0]
    return [pattern[(e + layer) % len(pattern)] for e in range(num_experts)]


def full_widths(layer: int, num_experts: int, dense: int) -> list[int]:
    return [dense] * num_experts


def aligned_widths(layer: int, num_experts: int, dense: int) -> list[int]:
    """Widths in multiples of 32 (as `compress --align 32` writes), with width-0 experts."""
    pattern = [dense, dense // 2, 0, dense, dense // 2, dense, 0, dense // 2]
    return [pattern[(e + 3 * layer) % len(pattern)] for e in range(num_experts)]


def zero_padded_dense(pruned: Path, out: Path) -> Path:
    """The stock (dense-architecture) folder computing exactly the pruned model's function: every
    expert back at the dense width, its removed neurons as zero rows/columns (act(0)*0 = 0). Stock
    vLLM serves it, so it is a reference for the pruned layer that involves no heapr code."""
    pruned, out = Path(pruned), Path(out)
    config = json.loads((pruned / "config.json").read_text())
    family = family_for(config)
    heapr = config.pop("heapr")
    dense = heapr["dense_width"]
    tensors = _all_tensors(pruned)
    new = {n: t for n, t in tensors.items() if not family.is_unserved(n)}  # stock text-only models load no vision tower
    gate_n, up_n, down_n = family.disk_projs
    ref = next(t for n, t in tensors.items() if not _EXPERT.match(n) and t.dim() == 2)
    hidden = int(text_view(config)["hidden_size"])
    prefix = next(m["prefix"] for n in tensors if (m := _EXPERT.match(n)))
    if family.expert_layout == "gpt_oss":  # back to the fused stacks of the stock layout, biases included
        new = {n: t for n, t in new.items() if ".experts." not in n}
        for layer, widths in heapr["expert_widths"].items():
            q = f"{prefix}{layer}.mlp.experts."
            E = len(widths)
            gate_up = torch.zeros(E, hidden, 2 * dense, dtype=ref.dtype)
            gate_up_bias = torch.zeros(E, 2 * dense, dtype=ref.dtype)
            down = torch.zeros(E, dense, hidden, dtype=ref.dtype)
            down_bias = torch.zeros(E, hidden, dtype=ref.dtype)
            for e, w in enumerate(widths):
                down_bias[e] = tensors[f"{q}{e}.down_proj.bias"]
                if not w:
                    continue
                gate_up[e, :, 0:2 * w:2] = tensors[f"{q}{e}.gate_proj.weight"].t()
                gate_up[e, :, 1:2 * w:2] = tensors[f"{q}{e}.up_proj.weight"].t()
                gate_up_bias[e, 0:2 * w:2] = tensors[f"{q}{e}.gate_proj.bias"]
                gate_up_bias[e, 1:2 * w:2] = tensors[f"{q}{e}.up_proj.bias"]
                down[e, :w] = tensors[f"{q}{e}.down_proj.weight"].t()
            new.update({q + "gate_up_proj": gate_up, q + "gate_up_proj_bias": gate_up_bias,
                        q + "down_proj": down, q + "down_proj_bias": down_bias})
    for layer, widths in (heapr["expert_widths"].items() if family.expert_layout != "gpt_oss" else ()):
        for e, w in enumerate(widths):
            for proj in (gate_n, up_n, down_n):
                name = family.expert_tensor_name(prefix, int(layer), e, (gate_n, up_n, down_n).index(proj))
                full = torch.zeros((hidden, dense) if proj == down_n else (dense, hidden), dtype=ref.dtype)
                if w:
                    t = tensors[name]
                    if proj == down_n:
                        full[:, :w] = t
                    else:
                        full[:w] = t
                new[name] = full
    out.mkdir(parents=True, exist_ok=True)
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    config["architectures"] = [family.architecture]  # the text-only causal LM, also for a vision-language source
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in pruned.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def zero_pruned_neurons(model, plan):
    """`model` (dense, fused experts) with every neuron `plan` removes zeroed in place: the function
    the pruned checkpoint must compute."""
    from heapr_serve.families import moe_blocks

    from heapr_serve.score.gpt_oss import is_gpt_oss_experts

    with torch.no_grad():
        for layer, block in moe_blocks(model).items():
            if is_gpt_oss_experts(block.experts):  # gate column 2j, up 2j+1 and their biases, down row j
                experts = block.experts
                for e, kept in enumerate(plan.keep[layer]):
                    dropped = torch.ones(experts.down_proj.shape[1], dtype=torch.bool)
                    dropped[kept] = False
                    for start in (0, 1):
                        experts.gate_up_proj[e][:, start::2][:, dropped] = 0
                        experts.gate_up_proj_bias[e][start::2][dropped] = 0
                    experts.down_proj[e][dropped] = 0
                continue
            width = block.experts.down_proj.shape[-1]
            for e, kept in enumerate(plan.keep[layer]):
                dropped = torch.ones(width, dtype=torch.bool)
                dropped[kept] = False
                block.experts.gate_up_proj[e, :width][dropped] = 0
                block.experts.gate_up_proj[e, width:][dropped] = 0
                block.experts.down_proj[e][:, dropped] = 0
    return model
