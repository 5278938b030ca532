"""Writing the pruned checkpoint (docs/checkpoint_format.md).

Tensors are streamed from the source safetensors one at a time and written in shards, so the pruned
model is never held next to the dense one; everything goes into a hidden temporary folder beside the
output that is renamed only when complete, and removed on any failure. The source is only read.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import torch

from heapr_serve.errors import HeaprError
from heapr_serve.families import PROJ_KINDS, Family, family_for
from heapr_serve.preflight import check_output, check_path_text, staged_folder
from heapr_serve.checkpoint.expert_tensors import expert_parts, expert_tensor
from heapr_serve.checkpoint.format import (FORMAT_VERSION, GPT_OSS_EXPERTS_TENSOR, MTP_REASON, MXFP4_TENSOR, SCALE_SUFFIX,
                                           dense_expert_width, num_routed_experts, open_safetensors, read_config, safetensors_files,
                                           tensor_layer)
from heapr_serve.checkpoint.source import RawSafetensors, SourceCheckpoint
from heapr_serve.progress import console

# Files that travel with the weights; anything else in the source (its model card, training notes,
# other formats) describes the dense model and stays behind.
_TRAVELLING_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                     "chat_template*", "generation_config.json", "*.model", "*.tiktoken", "*.py",
                     "preprocessor_config.json", "processor_config.json", "LICENSE*", "NOTICE*")
DEFAULT_SHARD_BYTES = 2 * 1024**3


def check_output_path(source: Path, out: Path, overwrite: bool, ratio: float = 0.0, copies: int = 1) -> None:
    """Refuse to clobber an existing folder unless asked, never write into the input, and check
    before any work that the output can be created with room for it (heapr_serve.preflight); `copies`
    2 when the pruned folder is written to scratch beside `out` first (`--quantize`)."""
    check_path_text("-o", out)
    out_abs, src_abs = out.resolve(), source.resolve()
    if out_abs == src_abs or src_abs in out_abs.parents or out_abs in src_abs.parents:
        raise HeaprError(f"-o {out}: the output must be outside the input model folder {source}; pick another path")
    check_output("-o", out, kind="folder", overwrite=overwrite, need_bytes=copies * estimated_output_bytes(source, ratio))


_BYTES_PER = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def estimated_output_bytes(source: Path, ratio: float) -> int:
    """Bytes the pruned checkpoint will take, from the source headers: routed-expert tensors shrink by
    `ratio`, FP8 weights and MXFP4 stacks are written as bfloat16 without their scales; plus 2% for the rest."""
    try:
        files = sorted(set(safetensors_files(source).values()))
        family = family_for(read_config(source))
    except HeaprError:  # no weights, or no family: the source checks that follow say so, with their own fix
        return 0
    total = 0
    for file in files:
        with open_safetensors(source / file) as f:
            for name in f.keys():
                mxfp4 = MXFP4_TENSOR.match(name)
                if name.endswith(SCALE_SUFFIX) or (mxfp4 and mxfp4["part"] == "scales"):
                    continue
                view = f.get_slice(name)
                # MXFP4 blocks: two values a byte, written in bfloat16
                size = torch.Size(view.get_shape()).numel() * (4 if mxfp4 else _BYTES_PER.get(view.get_dtype(), 2))
                expert = mxfp4 or expert_tensor(family, name) is not None
                total += int(size * (1 - ratio)) if expert else size
    return int(total * 1.02)


@contextmanager
def staging_folder(out: Path, overwrite: bool):
    """Yield a temporary folder next to `out`; on success it replaces `out`, on failure it vanishes
    (and an OS error becomes one line naming `out`)."""
    with staged_folder("-o", out, overwrite=overwrite) as tmp:
        yield tmp


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                       torch.float8_e5m2: "F8_E5M2"}


# safetensors' dtype order (its Rust `Dtype` enum): a shard holds its tensors widest dtype first
_DTYPE_RANK = {name: i for i, name in enumerate(["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
                                                  "I32", "U32", "F32", "F64", "I64", "U64"])}


class _ShardWriter:
    """Writes safetensors shards one tensor at a time: each tensor's bytes go to the shard's data file
    as soon as it is added, and the shard is assembled (header, then the data copied in chunks) when
    it is full. So the writer holds one tensor, never a shard: `safetensors.save_file` would hold the
    shard's tensors and then a serialised copy of them (twice the shard size, which set compress's
    peak memory on big models)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.entries: dict[str, dict] = {}  # the open shard's header
        self.size = 0
        self.data = None  # the open shard's data file
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.total_params = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.entries and self.size + nbytes > self.max_bytes:
            self.flush()
        if self.data is None:
            self.data = open(self.folder / f"part-{len(self.files):05d}.data", "wb")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise HeaprError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self.data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + nbytes]}
        self.size += nbytes
        self.total_bytes += nbytes
        self.total_params += tensor.numel()

    def flush(self) -> None:
        if self.data is None:
            return
        self.data.close()
        data_file, self.data = Path(self.data.name), None
        name = f"part-{len(self.files):05d}.safetensors"
        # safetensors' own layout (widest dtype first, then by name), so the shard is byte for byte what
        # `save_file` would have written
        order = sorted(self.entries, key=lambda n: (-_DTYPE_RANK[self.entries[n]["dtype"]], n))
        entries, offset = {}, 0
        for n in order:
            start, end = self.entries[n]["data_offsets"]
            entries[n] = {**self.entries[n], "data_offsets": [offset, offset + end - start]}
            offset += end - start
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(self.folder / name, "wb") as out, open(data_file, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            for n in order:
                start, end = self.entries[n]["data_offsets"]
                data.seek(start)
                left = end - start
                while left:
                    chunk = data.read(min(left, 16 << 20))
                    out.write(chunk)
                    left -= len(chunk)
        data_file.unlink()
        self.files.append((name, list(self.entries)))
        self.entries, self.size = {}, 0

    def finish(self) -> None:
        """Give shards their usual names and write the index."""
        self.flush()
        count = len(self.files)
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self.files):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / final)
            weight_map.update({n: final for n in names})
        # Always an index, even for one shard: loaders that glob *.safetensors (vLLM does when there is
        # no index) would otherwise take heapr_scores.safetensors for weights.
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _expert_slices(family: Family, name: str, tensor: torch.Tensor, keep: dict[int, list[torch.Tensor]], updates=None):
    """The pruned per-expert tensors for one source tensor, or None if it is not a routed expert.
    `updates(layer, key)` gives new kept-width values ("{expert}.gate|up|down", heapr_serve.prune.updates:
    `--reconstruct`, `--heal`) or None where the source's rows and columns stay."""

    def kept_part(layer: int, expert: int, part: str, dense: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        new = updates(layer, f"{expert}.{part}") if updates is not None else None
        old = dense.index_select(1 if part == "down" else 0, kept)
        if new is None:
            return old
        if new.shape != old.shape:
            raise ValueError(f"new {part} projection of layer {layer} expert {expert} has shape {list(new.shape)}, expected {list(old.shape)}")
        return new.to(dense.dtype)

    if family.expert_layout == "gpt_oss":
        return _gpt_oss_slices(family, name, tensor, keep, updates)
    found = expert_tensor(family, name)
    if found is None or found.layer not in keep:
        return None
    if found.expert is not None:
        kept = keep[found.layer][found.expert]
        if len(kept) == 0:
            return []
        return [(name, kept_part(found.layer, found.expert, found.part, tensor, kept))]
    parts = expert_parts(family, found, tensor)
    out = []
    for expert, kept in enumerate(keep[found.layer]):
        if len(kept) == 0:
            continue
        for part, stack in parts.items():
            name = family.expert_tensor_name(found.prefix, found.layer, expert, PROJ_KINDS.index(part))
            out.append((name, kept_part(found.layer, expert, part, stack[expert], kept)))
    return out


def _router(family: Family, name: str, tensor: torch.Tensor, keep: dict, updates) -> torch.Tensor:
    """The router weight as `--heal` tuned it, else the source's."""
    layer = tensor_layer(name)
    if updates is None or layer not in keep or not family.module_tensor_name(name).endswith(f".mlp.{family.router}.weight"):
        return tensor
    new = updates(layer, "router")
    if new is None:
        return tensor
    if new.shape != tensor.shape:
        raise ValueError(f"new router of layer {layer} has shape {list(new.shape)}, expected {list(tensor.shape)}")
    return new.to(tensor.dtype)


def _gpt_oss_slices(family: Family, name: str, tensor: torch.Tensor, keep: dict[int, list[torch.Tensor]], updates=None):
    """gpt-oss's on-disk stacks cut into per-expert tensors with their biases (heapr_serve.score.gpt_oss);
    every expert keeps its down bias, a width-0 expert nothing else."""
    from heapr_serve.score.gpt_oss import fused_slices

    if updates is not None:
        raise HeaprError("--reconstruct and --heal are not supported for gpt-oss yet (expert biases); drop them")
    m = GPT_OSS_EXPERTS_TENSOR.match(name)
    if not m or int(m["layer"]) not in keep:
        return None
    layer, kind = int(m["layer"]), m["kind"] + (m["bias"] or "")
    out = []
    for expert, kept in enumerate(keep[layer]):
        if len(kept) == 0 and kind != "down_proj_bias":
            continue
        for proj, piece in fused_slices(kind, tensor, expert, kept).items():
            out.append((f"{m['prefix']}{layer}.mlp.experts.{expert}.{proj}", piece.contiguous()))
    return out


def write_pruned_checkpoint(source: Path, folder: Path, family: Family, keep: dict[int, list[torch.Tensor]],
                            heapr: dict, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress=None,
                            drop_mtp: bool = False, updates=None) -> dict:
    """Write weights, config, tokenizer and side files of the pruned model into `folder` (a staging
    folder). Returns {"params": n, "bytes": n}.

    Beyond the MoE layers in `keep`: decoder layers past num_hidden_layers (DeepSeek-V3's MTP layer)
    are written whole, their experts per-expert at the dense width, and declared in
    `heapr.kept_whole_layers`, or left out with `drop_mtp` (config's count of them set to 0). An FP8
    block-quantised source is written dequantised to bfloat16, an MXFP4 one (gpt-oss) dequantised to
    its own dtype, without scales or quantization_config, and recorded in `heapr.source_quantization`. `updates(layer, key)`: new
    values of kept weights from `--reconstruct` or `--heal` (heapr_serve.prune.updates), or None."""
    source = Path(source)
    src = SourceCheckpoint(source)
    config = json.loads((source / "config.json").read_text())
    extra = src.extra_layers
    dense, num_experts = dense_expert_width(config), num_routed_experts(config)
    slices = dict(keep)
    if not drop_mtp:
        slices.update({layer: [torch.arange(dense)] * num_experts for layer in extra})
    fp8 = src.fp8_block is not None
    if fp8:
        console.print(f"note: {source} is FP8 block-quantised ({src.fp8_block[0]}x{src.fp8_block[1]} blocks); the pruned "
                      "checkpoint is written dequantised to bfloat16 without scales (pruned experts are served unquantised "
                      "for now), recorded in heapr.source_quantization", highlight=False, soft_wrap=True)
    # FP8 weights are written in bfloat16, what they are computed in; MXFP4 stacks in the source's dtype
    # (bfloat16 as released, like its other tensors), in which their values are exact
    written_as = torch.bfloat16 if fp8 else src.dtype
    if src.mxfp4:
        console.print(f"note: {source} has MXFP4 expert stacks (gpt-oss as released); the pruned checkpoint is written "
                      f"dequantised to {str(written_as).removeprefix('torch.')} without scales, recorded in "
                      "heapr.source_quantization", highlight=False, soft_wrap=True)

    # Qwen3-Next / Qwen3.5's separate MTP module (`mtp.*`): kept whole, or left out with `drop_mtp`
    mtp_module = "mtp." in family.unserved_prefixes
    dropped_mtp = sorted(n for n in src.files if drop_mtp and mtp_module and n.startswith("mtp."))
    writer = _ShardWriter(folder, max_shard_bytes)
    names_by_file: dict[str, list[str]] = {}
    for name, file in src.files.items():
        names_by_file.setdefault(file, []).append(name)
    dequantised = 0
    for file in sorted(names_by_file):
        with RawSafetensors(source / file) as f:  # plain reads: mapped pages would count as resident memory
            for name in sorted(names_by_file[file]):
                read_as = src.read_name(name)  # None for scales; an MXFP4 stack's blocks by the stack's name
                dropped = drop_mtp and (tensor_layer(name) in extra or (mtp_module and name.startswith("mtp.")))
                if read_as is not None and not dropped:
                    tensor = src.get(f, name, dequant_dtype=written_as)
                    dequantised += (fp8 and (name + SCALE_SUFFIX) in src.files) or read_as != name
                    pieces = _expert_slices(family, read_as, tensor, slices, updates)
                    for out_name, out_tensor in pieces if pieces is not None else [(read_as, _router(family, read_as, tensor, keep, updates))]:
                        writer.add(out_name, out_tensor)
                if progress is not None:
                    progress(name)
    writer.finish()

    record = {"format_version": FORMAT_VERSION, **heapr}
    config["architectures"] = [family.pruned_architecture]
    if drop_mtp and family.extra_layers_key and config.get(family.extra_layers_key):
        config[family.extra_layers_key] = 0
        if extra:
            record["dropped_layers"] = {str(layer): "MTP (num_nextn_predict_layers), dropped by --drop-mtp" for layer in extra}
    elif extra:
        record["kept_whole_layers"] = {str(layer): MTP_REASON for layer in extra}
    if dropped_mtp:
        text = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
        for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
            if text.get(key):
                text[key] = 0
        record["dropped_modules"] = {"mtp.": f"MTP module ({len(dropped_mtp)} tensors), dropped by --drop-mtp"}
    if fp8 or src.mxfp4:
        dtype_name = str(written_as).removeprefix("torch.")
        record["source_quantization"] = {**config.pop("quantization_config"), "written_as": dtype_name,
                                         "dequantised_tensors": int(dequantised)}
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = dtype_name
    config["heapr"] = record
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for item in sorted(source.iterdir()):
        if item.is_file() and any(fnmatch(item.name, pattern) for pattern in _TRAVELLING_FILES):
            shutil.copy2(item, folder / item.name)
    return {"params": writer.total_params, "bytes": writer.total_bytes}
