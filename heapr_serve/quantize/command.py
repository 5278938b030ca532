"""`heapr-serve quantize FOLDER -o OUT --scheme w4a16`: a compressed-tensors checkpoint vLLM loads.

Works on dense and pruned folders alike. Tensors are streamed one at a time (any model size fits in
memory) and quantized by round-to-nearest with compressed-tensors' own scale and packing code
(heapr_serve.quantize.rtn); the output goes through a staging folder renamed only when complete.
Every Linear weight is quantized except the router gates and the LM head, which stay in the source
dtype and are listed in the config's `ignore` (llm-compressor's recipe for MoE models); a dense folder
it writes serves in stock vLLM, a pruned one in heapr-serve's pruned layer, which checks every
quantized tensor against the declared widths.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Optional

import torch
import typer
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

from heapr_serve.checkpoint.format import PER_EXPERT_TENSOR, is_pruned, open_safetensors, read_config, safetensors_files
from heapr_serve.checkpoint.writer import _TRAVELLING_FILES, DEFAULT_SHARD_BYTES, _ShardWriter, check_output_path
from heapr_serve.errors import HeaprError
from heapr_serve.families import family_for
from heapr_serve.preflight import staged_folder
from heapr_serve.progress import console, progress_bar
from heapr_serve.quantize.rtn import alignment_unit, quantize_weight
from heapr_serve.quantize.schemes import SCHEMES, scheme_for

# Linear modules left unquantized by default: the router (tiny, and its logits decide routing) and
# the LM head, the names llm-compressor's MoE examples ignore; and a VL checkpoint's vision tower.
DEFAULT_IGNORE = (r".*\.gate$", r".*\.shared_expert_gate$", r"(.*\.)?lm_head$",
                  r"(.*\.)?visual\..*", r"(.*\.)?mtp\..*")  # vision towers and MTP heads (not served by the text model)
_NOT_LINEAR = re.compile(r"(embed_tokens|embeddings|wte|wpe)$")


def _is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and not _NOT_LINEAR.search(name[: -len(".weight")])


def plan_tensors(folder: Path, ignore: list[re.Pattern]) -> tuple[dict[str, str], list[str], dict[str, tuple[int, ...]]]:
    """(tensor -> file, module names left unquantized, tensor -> shape) from the headers alone."""
    files = safetensors_files(folder)
    shapes, skipped = {}, []
    for file in sorted(set(files.values())):
        with open_safetensors(folder / file) as f:
            for name in f.keys():
                piece = f.get_slice(name)
                if piece.get_dtype().startswith("F8") or name.endswith(("_scale_inv", "weight_scale", "weight_packed")):
                    raise HeaprError(f"{folder / file}: tensor {name} is already quantized; quantize from a bfloat16 / "
                                     "float32 folder (for an FP8 source, `heapr-serve compress` writes it dequantised)")
                shapes[name] = tuple(piece.get_shape())
    for name, shape in shapes.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module and _is_linear_weight(name, shape) and any(p.fullmatch(module) for p in ignore):
            skipped.append(module)
    return files, sorted(skipped), shapes


def _check_alignment(folder: Path, shapes: dict[str, tuple[int, ...]], quantized: set[str], scheme_name: str, unit: tuple[int, int]) -> None:
    """Every quantized weight's dimensions must hold whole groups / blocks: name the first that does not, and the fix."""
    unit_out, unit_in = unit
    if unit == (1, 1):
        return
    for name in sorted(quantized):
        out_f, in_f = shapes[name]
        if out_f % unit_out == 0 and in_f % unit_in == 0:
            continue
        m = PER_EXPERT_TENSOR.match(name)
        what = f"expert {m['expert']} of layer {m['layer']} ({name}, {list(shapes[name])})" if m else f"{name} {list(shapes[name])}"
        need = unit_in if in_f % unit_in else unit_out
        fix = (f"re-run `heapr-serve compress` / `apply` with --align {need}" if m and is_pruned(folder)
               else f"leave it out with --ignore '{re.escape(name[: -len('.weight')])}'")
        other = "--group-size -1 (per channel), a --group-size that divides it" if unit_out == 1 else "another --scheme"
        raise HeaprError(f"--scheme {scheme_name}: {what} is not a multiple of the scheme's {unit_out}x{unit_in} quantization "
                         f"unit; {fix}, or pass {other}")


def quantize_folder(source: Path, out: Path, scheme_name: str, group_size: int | None, ignore: list[str],
                    overwrite: bool, only_experts: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    calibrate=None, carry: tuple[str, ...] = ()) -> dict:
    """Write the quantized copy of `source` to `out`; returns the record stored in its config.
    `calibrate(scheme, fmt, modules)` (GPTQ) runs once the scheme is settled, for the transformers
    module names of the weights to quantize, and returns (lookup, method): `lookup(name)` gives a
    weight's compressed tensors by its on-disk name (None: round to nearest)."""
    config = read_config(source)
    family_for(config)  # an unknown family is refused before any work
    if config.get("quantization_config"):
        raise HeaprError(f"{source / 'config.json'}: already has a quantization_config "
                         f"({config['quantization_config'].get('quant_method')}); quantize from a bfloat16 / float32 folder")
    spec = scheme_for(scheme_name)
    pruned = is_pruned(source)
    if pruned:
        from heapr_serve.checkpoint.validate import validate_checkpoint

        validate_checkpoint(source)  # widths vs tensors, before anything is written
    check_output_path(source, out, overwrite)
    patterns = [re.compile(p) for p in (*DEFAULT_IGNORE, *ignore)]
    files, skipped, shapes = plan_tensors(source, patterns)
    skipped_set = set(skipped)
    if only_experts:  # attention, dense MLPs and shared experts stay in the source dtype, listed in `ignore`
        kept = sorted(n[: -len(".weight")] for n, s in shapes.items()
                      if _is_linear_weight(n, s) and not PER_EXPERT_TENSOR.match(n) and n[: -len(".weight")] not in skipped_set)
        skipped, skipped_set = sorted(skipped + kept), skipped_set | set(kept)
    quantized = {n for n, s in shapes.items() if _is_linear_weight(n, s) and n[: -len(".weight")] not in skipped_set}
    if not quantized:
        raise HeaprError(f"{source}: no Linear weights left to quantize (all matched --ignore)")
    if group_size is None:
        group_size = spec.fitting_group(sorted({shapes[n][1] for n in quantized}))
        preset = spec.build(None).weights.group_size
        if group_size is not None and group_size != preset:
            console.print(f"{scheme_name}: groups of {group_size if group_size > 0 else 'one channel'} (the scheme's {preset} does not divide "
                          f"every quantized weight's input width; pass --group-size to choose)", highlight=False)
    scheme = spec.build(group_size)
    _check_alignment(source, shapes, quantized, scheme_name, alignment_unit(scheme))
    computed, method = None, "round-to-nearest (compressed-tensors qparams)"
    if calibrate is not None:
        family = family_for(config)
        computed, method = calibrate(scheme, spec.format, {family.module_tensor_name(n)[: -len(".weight")] for n in quantized})

    source_bytes = quant_bytes = 0
    with staged_folder("-o", out, overwrite=overwrite) as folder, progress_bar() as bar:
        task = bar.add_task(f"quantize {scheme_name}", total=len(shapes))
        writer = _ShardWriter(folder, max_shard_bytes)
        by_file: dict[str, list[str]] = {}
        for name, file in files.items():
            by_file.setdefault(file, []).append(name)
        for file in sorted(by_file):
            with open_safetensors(source / file) as f:
                for name in sorted(by_file[file]):
                    tensor = f.get_tensor(name)
                    if name in quantized:
                        module = name[: -len(".weight")]
                        source_bytes += tensor.numel() * tensor.element_size()
                        parts = computed(name) if computed is not None else None
                        if parts is None and computed is not None:
                            raise HeaprError(f"{source / file}: GPTQ computed no values for {name}; re-run, or quantize with --method rtn")
                        if parts is None:
                            parts = quantize_weight(tensor, scheme, spec.format)
                        elif [int(v) for v in parts.get("weight_shape", torch.tensor(parts.get("weight", tensor).shape))] != list(tensor.shape):
                            raise HeaprError(f"{source / file}: {name} {list(tensor.shape)} is not the weight GPTQ quantized; re-run the command")
                        for local, value in parts.items():
                            quant_bytes += value.numel() * value.element_size()
                            writer.add(f"{module}.{local}", value)
                    else:
                        writer.add(name, tensor)
                    bar.advance(task)
        writer.finish()
        qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format=spec.format, ignore=skipped,
                                     quantization_status=QuantizationStatus.COMPRESSED)
        saved = dict(config)
        saved["quantization_config"] = qconfig.model_dump(exclude_none=True, mode="json")
        record = {"scheme": scheme_name, "preset": spec.preset, "format": spec.format, "summary": spec.summary,
                  "group_size": scheme.weights.group_size, "strategy": str(getattr(scheme.weights.strategy, "value", scheme.weights.strategy)),
                  "method": method, "quantized_tensors": len(quantized),
                  "ignored_modules": len(skipped), "only_experts": bool(only_experts), "weight_bytes_before": source_bytes, "weight_bytes_after": quant_bytes,
                  "total_bytes": writer.total_bytes}
        if pruned:
            saved["heapr"] = {**saved["heapr"], "quantization": record}
        else:
            saved["heapr_quantization"] = record
        (folder / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        for item in sorted(source.iterdir()):
            if item.is_file() and any(fnmatch(item.name, pattern) for pattern in (*_TRAVELLING_FILES, *carry)):
                shutil.copy2(item, folder / item.name)
        _write_card(source, folder, record, out.name)
    return record


def _write_card(source: Path, folder: Path, record: dict, name: str) -> None:
    """Carry the source's model card (a pruned folder's says what was pruned) and add the quantization."""
    card = source / "README.md"
    text = card.read_text() if card.is_file() else f"# {name}\n"
    saved = 1 - record["weight_bytes_after"] / max(record["weight_bytes_before"], 1)
    text += (f"\n## Quantization\n\nQuantized by `heapr-serve quantize --scheme {record['scheme']}` "
             f"(compressed-tensors `{record['format']}`, {record['summary']}; {record['method']}).\n\n"
             "| | before | after |\n|---|---:|---:|\n"
             f"| quantized Linear weights | {record['weight_bytes_before']:,} B | {record['weight_bytes_after']:,} B (-{saved:.1%}) |\n"
             f"| checkpoint tensors | | {record['total_bytes']:,} B |\n\n"
             f"{record['ignored_modules']} Linear modules ({'everything but the routed experts' if record['only_experts'] else 'router gates, LM head'}) "
             "stay unquantized.\n")
    (folder / "README.md").write_text(text)


def _standalone_gptq(folder: Path, out: Path, calib, nsamples: int, seq_len: int, batch_size: int, seed: int, device: str, stack):
    """`quantize --method gptq` on a dense folder: its calibration batches, and the GPTQ pass over it."""
    from heapr_serve.calibrate.datasets import load_calibration
    from heapr_serve.checkpoint.source import SourceCheckpoint
    from heapr_serve.models import load_tokenizer, pick_device
    from heapr_serve.prune.reconstruct import temporary_folder
    from heapr_serve.quantize.after_pruning import QuantizeOptions, QuantizeRun, gptq_calibration
    from heapr_serve.score import distributed

    config = read_config(folder)
    if is_pruned(folder):
        raise HeaprError(f"{folder}: is pruned; GPTQ runs in the pruning run, over the dense source: `heapr-serve apply {folder} -o OUT "
                         f"--ratio {config['heapr'].get('ratio')} --quantize SCHEME` (its saved scores, no new scoring), or --method rtn here")
    if distributed.ranks_from_env().world > 1:
        raise HeaprError("quantize --method gptq runs in one process; run it without torchrun")
    family = family_for(config)
    if family.expert_layout != "standard":
        raise HeaprError(f"--method gptq is not supported for {config['model_type']} yet (expert biases); use --method rtn")
    tokenizer = load_tokenizer(folder)
    calibration = load_calibration(calib, tokenizer, nsamples, seq_len, seed, int(config["vocab_size"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    source = SourceCheckpoint(folder)
    run = QuantizeRun(QuantizeOptions("w4a16"), list(calibration.batches(batch_size, pad_id)), source.dtype, pick_device(device))

    def calibrate(scheme, fmt, modules):  # its scratch folder lives until the quantized folder is written
        scratch = Path(stack.enter_context(temporary_folder(out)))
        with progress_bar() as progress:
            return gptq_calibration(folder, family, None, run, None, scratch, progress)(scheme, fmt, modules)
    return calibrate


def quantize_command(
    folder: Path = typer.Argument(..., help="A dense or pruned checkpoint folder (bfloat16 / float32 safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the quantized checkpoint."),
    scheme: str = typer.Option("w4a16", help=f"Quantization scheme: {', '.join(SCHEMES)}."),
    group_size: Optional[int] = typer.Option(None, help="Group size along the input dimension (-1: per channel; default: the scheme's where it divides every weight's input width, else the largest of 64, 32, 16, 8 that does)."),
    ignore: list[str] = typer.Option([], "--ignore", help="Regex of Linear module names to leave unquantized (repeatable); router gates and lm_head always are."),
    only_experts: bool = typer.Option(False, "--only-experts", help="Quantize only the routed experts (attention, dense MLPs and shared experts stay in the source dtype)."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
    method: str = typer.Option("rtn", "--method", help="rtn (round to nearest) or gptq (calibrated: a forward pass over --calib, one decoder layer at a time)."),
    calib: Optional[str] = typer.Option(None, help="--method gptq: calibration .txt/.jsonl file or folder (default: built-in text)."),
    nsamples: int = typer.Option(64, min=1, help="--method gptq: number of calibration sequences."),
    seq_len: int = typer.Option(256, min=2, help="--method gptq: tokens per calibration sequence."),
    batch_size: int = typer.Option(8, min=1, help="--method gptq: sequences per forward pass."),
    seed: int = typer.Option(0, help="--method gptq: seed for drawing calibration windows."),
    device: str = typer.Option("auto", help="--method gptq: auto (a CUDA GPU when present), cpu, cuda, cuda:N."),
) -> None:
    """Quantize a dense or pruned checkpoint into the compressed-tensors format vLLM serves."""
    start = time.perf_counter()
    if not folder.is_dir():
        raise HeaprError(f"{folder}: not a folder; pass a checkpoint folder (config.json + safetensors)")
    for pattern in ignore:
        try:
            re.compile(pattern)
        except re.error as err:
            raise HeaprError(f"--ignore {pattern!r}: not a valid regular expression ({err})") from None
    if method not in ("rtn", "gptq"):
        raise HeaprError(f"--method {method!r}: use rtn (round to nearest, the default) or gptq (calibrated)")
    with contextlib.ExitStack() as stack:
        calibrate = _standalone_gptq(folder, out, calib, nsamples, seq_len, batch_size, seed, device, stack) if method == "gptq" else None
        record = quantize_folder(folder, out, scheme, group_size, list(ignore), overwrite, only_experts, calibrate=calibrate)
    saved = 1 - record["weight_bytes_after"] / max(record["weight_bytes_before"], 1)
    console.print(f"wrote {out}: {record['quantized_tensors']} Linear weights quantized to {scheme} "
                  f"({record['weight_bytes_before'] / 2**20:.2f} MiB -> {record['weight_bytes_after'] / 2**20:.2f} MiB, "
                  f"-{saved:.1%}); {record['ignored_modules']} left unquantized; {time.perf_counter() - start:.1f} s",
                  highlight=False)
