"""Reading a dense source checkpoint tensor by tensor, and materialising its modules from it.

The streamed calibration pass builds the model on the meta device and fills one module (a decoder
layer, the embeddings, the head) at a time from the memory-mapped safetensors, so the whole model is
never resident. Everything a real checkpoint may hold is handled here, once:

- per-expert 2-D tensors on disk (as transformers writes them) or fused `gate_up_proj`/`down_proj`
  stacks, both filled into transformers' fused experts;
- FP8 block-quantised weights (DeepSeek-V3's `weight_scale_inv`, Qwen3-FP8): dequantised to the
  calibration dtype as they are read (heapr_serve.checkpoint.quantized_source);
- MXFP4 expert stacks (gpt-oss as released: `experts.gate_up_proj_blocks` / `_scales`): dequantised
  with transformers' own arithmetic to the stacks transformers' model holds, under their names;
- parameters the model keeps in float32 (DeepSeek-V3's `e_score_correction_bias`) stay float32:
  `build_meta_model` applies the model's `_keep_in_fp32_modules(_strict)` as `from_pretrained` does,
  and each tensor is copied into the module's own parameter;
- tied input/output embeddings; decoder layers past `num_hidden_layers` (MTP) are never read here
  (the writer keeps them whole or drops them), but tensors of layers the config does not declare
  are refused.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from heapr_serve.checkpoint.expert_tensors import gate_and_up
from heapr_serve.checkpoint.format import (MXFP4_TENSOR, SCALE_SUFFIX, extra_layers, open_safetensors, read_config,
                                           safetensors_files)
from heapr_serve.checkpoint.quantized_source import (FP8_DTYPES, check_fp8_headers, check_mxfp4_headers, dequantize_fp8,
                                                     dequantize_mxfp4, fp8_block_size, is_mxfp4)
from heapr_serve.errors import HeaprError
from heapr_serve.families import Family, family_for

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class RawSafetensors:
    """Reads safetensors tensors with plain file reads into fresh tensors, not through a memory map:
    mapped file pages count as this process's resident memory while the file is open, which would
    double a streamed layer's footprint. Same format, same one-line errors."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "RawSafetensors":
        try:
            self.f = open(self.path, "rb")
            size = int.from_bytes(self.f.read(8), "little")
            if not 0 < size < 100 << 20:
                raise ValueError("bad header length")
            self.header = json.loads(self.f.read(size))
            self.base = 8 + size
        except (OSError, ValueError) as err:
            raise HeaprError(f"{self.path}: not a readable safetensors file ({err}); re-download or re-create it") from None
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.header.get(name)
        if info is None or info.get("dtype") not in _DTYPES:
            raise HeaprError(f"{self.path}: no readable tensor {name} in its header")
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        view = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if view is not None:
            if view.nbytes != end - start:
                raise HeaprError(f"{self.path}: tensor {name} has {end - start} bytes for shape {info['shape']}; the file is corrupt")
            self.f.seek(self.base + start)
            if self.f.readinto(memoryview(view)) != view.nbytes:
                raise HeaprError(f"{self.path}: truncated while reading {name}; re-download or re-create it")
        return out


class SourceCheckpoint:
    """A dense Hugging Face folder, read lazily: names, shapes and tensors (dequantised) on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = read_config(self.path)
        self.family: Family = family_for(self.config)
        self.files = safetensors_files(self.path)  # disk name -> file
        self.fp8_block = fp8_block_size(self.config, self.path / "config.json")
        self.mxfp4 = is_mxfp4(self.config, self.path / "config.json")
        # transformers module name -> disk name, for every stored tensor but scales (an MXFP4 stack by its blocks)
        self.by_module = {self.family.module_tensor_name(read): n for n in self.files if (read := self.read_name(n)) is not None}
        self.num_layers = int(self.config["num_hidden_layers"])
        # decoder layers past num_hidden_layers with tensors on disk (DeepSeek-V3's MTP layer); checked
        self.extra_layers = extra_layers(self.config, self.files, self.path, self.family.extra_layers_key)
        if self.fp8_block is None and (scale := next((n for n in self.files if n.endswith(SCALE_SUFFIX)), None)):
            raise HeaprError(f"{self.path}: tensor {scale} is an FP8 block scale, but config.json declares no fp8 quantization_config")
        if not self.mxfp4 and (part := next((n for n in self.files if MXFP4_TENSOR.match(n)), None)):
            raise HeaprError(f"{self.path}: tensor {part} is part of an MXFP4 stack, but config.json declares no mxfp4 "
                             "quantization_config; restore the released config.json")
        if self.fp8_block is not None:
            check_fp8_headers(self.path, self.files, self.fp8_block)
        if self.mxfp4:
            check_mxfp4_headers(self.path, self.config, self.files)

    def read_name(self, disk_name: str) -> str | None:
        """The name a stored tensor has once read: an MXFP4 stack's `_blocks` the stack's own name;
        None for scales (FP8 or MXFP4), which are read with their weights and never stand alone."""
        if disk_name.endswith(SCALE_SUFFIX):
            return None
        m = MXFP4_TENSOR.match(disk_name) if self.mxfp4 else None
        if m:
            return m["stack"] if m["part"] == "blocks" else None
        return disk_name

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's own floating dtype (bfloat16 for FP8 sources: what they are computed in;
        an MXFP4 source's declared one, bfloat16 as released)."""
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "float32"
        if self.fp8_block is not None:
            return torch.bfloat16
        dtype = getattr(torch, str(name).replace("torch.", ""), None)
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32

    def read(self, disk_names: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors (FP8 ones and MXFP4 stacks dequantised to float32), one file opened at a time and closed
        again, so only what was read stays resident."""
        by_file: dict[str, list[str]] = {}
        for name in disk_names:
            if name not in self.files:
                raise HeaprError(f"{self.path}: tensor {name} is missing from the checkpoint")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, names in by_file.items():
            with open_safetensors(self.path / file) as f:
                for name in names:
                    out[name] = self.get(f, name).to(device)
        return out

    def get(self, f, name: str, dequant_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name` from the open file `f`; an FP8 one or an MXFP4 stack's blocks dequantised (to
        `dequant_dtype`) with its scales, which may sit in another shard."""
        file = self.path / self.files.get(name, "?")
        if self.mxfp4 and (m := MXFP4_TENSOR.match(name)) and m["part"] == "blocks":
            blocks, scales = f.get_tensor(name), self._companion(f, name, m["stack"] + "_scales", "MXFP4")
            try:
                return dequantize_mxfp4(blocks, scales, dequant_dtype, m["stack"])
            except HeaprError as err:
                raise HeaprError(f"{file}: {err}") from None
        tensor = f.get_tensor(name)
        if tensor.dtype not in FP8_DTYPES:
            return tensor
        if self.fp8_block is None:
            raise HeaprError(f"{file}: {name} is FP8 but config.json declares no fp8 quantization_config")
        scale = self._companion(f, name, name + SCALE_SUFFIX, "FP8")
        try:
            return dequantize_fp8(tensor, scale, self.fp8_block, name).to(dequant_dtype)
        except HeaprError as err:
            raise HeaprError(f"{file}: {err}") from None

    def _companion(self, f, name: str, scale_name: str, kind: str) -> torch.Tensor:
        """The scales `scale_name` of tensor `name` (open in `f`), from its shard or another one."""
        if scale_name not in self.files:
            raise HeaprError(f"{self.path / self.files.get(name, '?')}: {kind} tensor {name} has no {scale_name}; the checkpoint is incomplete")
        if self.files[scale_name] == self.files.get(name):
            return f.get_tensor(scale_name)
        with RawSafetensors(self.path / self.files[scale_name]) as g:
            return g.get_tensor(scale_name)

    # -- filling modules -----------------------------------------------------------------------------

    def _sources(self, key: str, param: torch.Tensor) -> list[str] | None:
        """Disk names that make module tensor `key`: itself, or the per-expert tensors of a fused stack."""
        if key in self.by_module:
            return [self.by_module[key]]
        m = re.match(r"^(?P<owner>.+\.experts)\.(?P<which>gate_up_proj|down_proj)$", key)
        if m:
            projs = ("gate_proj", "up_proj") if m["which"] == "gate_up_proj" else ("down_proj",)
            names = [self.by_module.get(f"{m['owner']}.{e}.{p}.weight") for e in range(param.shape[0]) for p in projs]
            if all(names):
                return names
        return None

    def load_module(self, module: nn.Module, prefix: str, device: str | torch.device) -> nn.Module:
        """Materialise `module` (built on the meta device; its state-dict keys prefixed by `prefix` in
        the full model) on `device` with its weights from disk. Returns the module."""
        module.to_empty(device=device)
        state = module.state_dict(keep_vars=True)  # parameters and persistent buffers
        plan, missing = {}, []
        for key, target in state.items():
            names = self._sources(prefix + key, target)
            if names is None:
                tied = prefix + key == "lm_head.weight" and self.config.get("tie_word_embeddings")
                names = [self.by_module["model.embed_tokens.weight"]] if tied else None
            if names is None:
                missing.append(prefix + key)
            else:
                plan[key] = names
        if missing:
            raise HeaprError(f"{self.path}: no tensor on disk for {missing[:3]}; is this a complete {self.family.architecture} checkpoint?")
        # one source tensor at a time, read (plain file reads, no memory map) and copied into its place:
        # the peak is the module plus one tensor
        handles: dict = {}
        with torch.no_grad(), ExitStack() as files:
            for key, names in plan.items():
                target = state[key]
                if len(names) == 1:
                    parts = [(target, names[0])]
                elif key.endswith("gate_up_proj"):  # [E, 2I, H] from per-expert gate [I, H] and up [I, H]
                    gate_up = gate_and_up(self.family, target)
                    parts = [(gate_up[i % 2][i // 2], n) for i, n in enumerate(names)]
                else:  # down_proj [E, H, I]
                    parts = [(target[e], n) for e, n in enumerate(names)]
                for place, name in parts:
                    file = self.files[name]
                    if file not in handles:
                        handles[file] = files.enter_context(RawSafetensors(self.path / file))
                    value = self.get(handles[file], name, dequant_dtype=place.dtype)
                    if tuple(value.shape) != tuple(place.shape):
                        raise HeaprError(f"{self.path}: {name} has shape {list(value.shape)}, the model expects {list(place.shape)} for {prefix + key}")
                    place.copy_(value)
                    del value
        rebuild_non_persistent_buffers(module, device)
        return module


def rebuild_non_persistent_buffers(module: nn.Module, device) -> None:
    """Buffers not stored in checkpoints (rotary inverse frequencies) are recomputed on `device`;
    any other non-persistent buffer would hold garbage after `to_empty`, so it is refused."""
    for owner_name, owner in module.named_modules():
        rotary = type(owner).__name__.endswith("RotaryEmbedding")
        if getattr(owner, "_non_persistent_buffers_set", None) and not rotary:
            raise HeaprError(f"{type(owner).__name__} ({owner_name or 'the model'}) has buffers no checkpoint stores; streamed loading does not support it")
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config=child.config).to(device))
    if type(module).__name__.endswith("RotaryEmbedding"):
        fresh = type(module)(config=module.config).to(device)
        for name, buf in fresh.named_buffers(recurse=False):
            setattr(module, name, buf)


def fp32_patterns(model, dtype: torch.dtype) -> re.Pattern | None:
    """The model's own keep-in-float32 rule, as `from_pretrained` applies it: `_keep_in_fp32_modules`
    when loading in float16, `_keep_in_fp32_modules_strict` in float16 or bfloat16 (DeepSeek-V3's
    `e_score_correction_bias`). A regex to search tensor names with, or None."""
    globs = set()
    if dtype == torch.float16:
        globs |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        globs |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return re.compile("|".join(g.replace("*", ".*") for g in sorted(globs))) if globs else None


def keep_fp32(model, dtype: torch.dtype):
    """Cast the tensors the model keeps in float32 back to float32 (in place; meta tensors too):
    `from_config(dtype=...)`, unlike `from_pretrained`, casts everything."""
    pattern = fp32_patterns(model, dtype)
    if pattern is None:
        return model
    for module_name, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None and tensor.is_floating_point() and pattern.search(f"{module_name}.{name}"):
                    cast = tensor.to(torch.float32)
                    store[name] = nn.Parameter(cast, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else cast
    return model


def build_meta_model(config_path: Path, dtype: torch.dtype):
    """The transformers model of a dense folder, on the meta device (no memory), in `dtype` (but the
    tensors the model keeps in float32 in float32, as `from_pretrained` would)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_path))
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # FP8 and MXFP4 sources are dequantised on read
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return keep_fp32(model, dtype).eval()


def load_dense(path: Path, dtype: torch.dtype, device: torch.device):
    """The whole dense model, read through `SourceCheckpoint` (so FP8 and MXFP4 sources load dequantised)."""
    source = SourceCheckpoint(path)
    model = build_meta_model(path, dtype)
    source.load_module(model, "", device)
    if source.config.get("tie_word_embeddings"):
        model.lm_head.weight = model.get_input_embeddings().weight
    return model
