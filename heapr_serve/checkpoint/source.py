"""Reading a dense source checkpoint tensor by tensor, and materialising its modules from it.

The streamed calibration pass builds the model on the meta device and fills one module (a decoder
layer, the embeddings, the head) at a time from the memory-mapped safetensors, so the whole model is
never resident. Everything a real checkpoint may hold is handled here, once:

- per-expert 2-D tensors on disk (as transformers writes them) or fused `gate_up_proj`/`down_proj`
  stacks, both filled into transformers' fused experts;
- FP8 block-quantised weights (DeepSeek-V3's `weight_scale_inv`, Qwen3-FP8): dequantised to the
  calibration dtype as they are read;
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
from heapr_serve.errors import HeaprError
from heapr_serve.families import Family, family_for

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


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


def fp8_block_size(config: dict, config_file: Path | str = "config.json") -> tuple[int, int] | None:
    """(rows, cols) of the source's FP8 weight blocks, or None when it is not quantised; any other
    quantisation, or FP8 that is not block-quantised with dynamic activation scales, is refused."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower() if isinstance(q, dict) else ""
    if method == "mxfp4":  # gpt-oss as released: its expert stacks, read dequantised (is_mxfp4)
        is_mxfp4(config, config_file)
        return None
    if method != "fp8":
        raise HeaprError(f"{config_file}: quantization_config.quant_method {method or '?'!r} is not supported; pass the "
                         "unquantised checkpoint (or a block-quantised FP8 one, DeepSeek-V3 / Qwen3-FP8 style)")
    block = q.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise HeaprError(f"{config_file}: quantization_config is fp8 without a valid weight_block_size (got {block!r}); "
                         "only block-quantised FP8 sources (DeepSeek-V3 style, e.g. [128, 128]) are supported")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise HeaprError(f"{config_file}: quantization_config.activation_scheme is {scheme!r}; only dynamic activation "
                         "scaling (no stored input scales) is supported for FP8 sources")
    return int(block[0]), int(block[1])


def is_mxfp4(config: dict, config_file: Path | str = "config.json") -> bool:
    """Whether the source is MXFP4 as gpt-oss ships it (expert stacks only; the rest bfloat16). The
    layout read is gpt-oss's, so any other family declaring MXFP4 is refused."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or str(q.get("quant_method", "")).lower() != "mxfp4":
        return False
    if config.get("model_type") != "gpt_oss":
        raise HeaprError(f"{config_file}: quantization_config.quant_method 'mxfp4' is read for gpt-oss only (its expert "
                         f"stacks), not model_type {config.get('model_type')!r}; pass the unquantised checkpoint")
    return True


MXFP4_GROUP = 32  # values per e8m0 scale: 16 bytes of two e2m1 nibbles


def mxfp4_expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The released blocks shapes per stack, from config.json: gate_up [E, 2I, H/32, 16] (gate/up
    interleaved along 2I), down [E, H, I/32, 16]; scales are the same without the last axis."""
    experts, hidden, width = (int(config[k]) for k in ("num_local_experts", "hidden_size", "intermediate_size"))
    return {"gate_up_proj": (experts, 2 * width, hidden // MXFP4_GROUP, 16), "down_proj": (experts, hidden, width // MXFP4_GROUP, 16)}


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                     name: str = "experts.gate_up_proj") -> torch.Tensor:
    """transformers' own MXFP4 dequantisation (integrations/mxfp4.py `convert_moe_packed_tensors`,
    CPU-safe): e2m1 nibbles, low nibble first, times 2^(scale - 127), the last two axes swapped, so
    gate_up [E, 2I, H/32, 16] -> [E, H, 2I] and down [E, H, I/32, 16] -> [E, I, H] as its modules hold
    them. Exact in float32 and bfloat16 (same exponent range); other dtypes are cast from float32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != 16 \
            or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise HeaprError(f"{name}_blocks {blocks.dtype} {list(blocks.shape)} and {name}_scales {scales.dtype} {list(scales.shape)} "
                         "are not MXFP4 (uint8 blocks [E, R, G, 16] with uint8 scales [E, R, G])")
    exact = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    # chunks of 2^20 rows bound the int32 index temporaries to 64 MiB
    return convert_moe_packed_tensors(blocks, scales, dtype=exact, rows_per_chunk=1 << 20).to(dtype)


def check_scale_shape(weight_shape, scale_shape, block: tuple[int, int], name: str) -> None:
    """A block scale has one entry per (block rows x block cols) tile, partial edge tiles included."""
    *lead, rows, cols = weight_shape
    expected = (*lead, -(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_shape) != expected:
        raise HeaprError(f"{name}{SCALE_SUFFIX} has shape {list(scale_shape)}, but {name} {list(weight_shape)} in "
                         f"{block[0]}x{block[1]} blocks needs {list(expected)}; the checkpoint's scales do not match its weights")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "weight") -> torch.Tensor:
    """W = W_fp8 * scale per (block rows x block cols) tile, in float32 (partial edge tiles included)."""
    rows, cols = weight.shape[-2:]
    check_scale_shape(tuple(weight.shape), tuple(scale_inv.shape), block, name)
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.float() * scale


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
            self._check_fp8_headers()
        if self.mxfp4:
            self._check_mxfp4_headers()

    def read_name(self, disk_name: str) -> str | None:
        """The name a stored tensor has once read: an MXFP4 stack's `_blocks` the stack's own name;
        None for scales (FP8 or MXFP4), which are read with their weights and never stand alone."""
        if disk_name.endswith(SCALE_SUFFIX):
            return None
        m = MXFP4_TENSOR.match(disk_name) if self.mxfp4 else None
        if m:
            return m["stack"] if m["part"] == "blocks" else None
        return disk_name

    def _check_mxfp4_headers(self) -> None:
        """Every MXFP4 stack has uint8 blocks and scales of the released shapes for config.json's sizes
        (safetensors headers only), so a broken checkpoint is refused before any calibration."""
        sizes = {k: self.config.get(k) for k in ("num_local_experts", "hidden_size", "intermediate_size")}
        blocked = (sizes["hidden_size"], sizes["intermediate_size"])
        if not all(isinstance(v, int) and v > 0 for v in sizes.values()) or any(v % MXFP4_GROUP for v in blocked):
            raise HeaprError(f"{self.path / 'config.json'}: an MXFP4 source needs num_local_experts, and hidden_size and "
                             f"intermediate_size multiples of {MXFP4_GROUP} (got {sizes}); the config does not match the checkpoint")
        expected = mxfp4_expected_shapes(self.config)
        parts: dict[str, dict[str, tuple]] = {}
        for file in sorted(set(self.files.values())):
            with open_safetensors(self.path / file) as f:
                for name in f.keys():
                    if (m := MXFP4_TENSOR.match(name)):
                        piece = f.get_slice(name)
                        parts.setdefault(m["stack"], {})[m["part"]] = (name, file, tuple(piece.get_shape()), piece.get_dtype(), m["kind"])
        for stack, found in sorted(parts.items()):
            for part, other in (("blocks", "scales"), ("scales", "blocks")):
                if part in found and other not in found:
                    name, file = found[part][:2]
                    raise HeaprError(f"{self.path / file}: MXFP4 tensor {name} has no {stack}_{other}; the checkpoint is incomplete")
            for part, (name, file, shape, dtype, kind) in found.items():
                want = expected[kind] if part == "blocks" else expected[kind][:-1]
                if dtype != "U8" or shape != want:
                    raise HeaprError(f"{self.path / file}: MXFP4 tensor {name} is {dtype} {list(shape)}, but config.json's sizes "
                                     f"need U8 {list(want)}; the checkpoint does not match its config")

    def _check_fp8_headers(self) -> None:
        """Every FP8 weight has a block scale of the right shape (safetensors headers only), so a broken
        checkpoint is refused before any calibration, not in the middle of it."""
        shapes, fp8 = {}, []
        for file in sorted(set(self.files.values())):
            with open_safetensors(self.path / file) as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    shapes[name] = tuple(piece.get_shape())
                    if piece.get_dtype().startswith("F8"):
                        fp8.append((name, file))
        for name, file in fp8:
            scale = shapes.get(name + SCALE_SUFFIX)
            if scale is None:
                raise HeaprError(f"{self.path / file}: FP8 tensor {name} has no {name + SCALE_SUFFIX}; the checkpoint is incomplete")
            try:
                check_scale_shape(shapes[name], scale, self.fp8_block, name)
            except HeaprError as err:
                raise HeaprError(f"{self.path / file}: {err}") from None

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
