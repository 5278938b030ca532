"""`heapr-serve quantize FOLDER -o OUT --scheme w4a16`: a compressed-tensors checkpoint vLLM loads.

Works on dense and pruned folders alike. Tensors are streamed one at a time (any model size fits in
memory) and quantized by round-to-nearest with compressed-tensors' own scale and packing code
(heapr_serve.quantize.rtn) by heapr_serve.quantize.folder; the output goes through a staging folder
renamed only when complete. Every Linear weight is quantized except the router gates and the LM head, which stay in the source
dtype and are listed in the config's `ignore` (llm-compressor's recipe for MoE models); a dense folder
it writes serves in stock vLLM, a pruned one in heapr-serve's pruned layer, which checks every
quantized tensor against the declared widths.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Optional

import typer

from heapr_serve.checkpoint.format import is_pruned, read_config
from heapr_serve.errors import HeaprError
from heapr_serve.families import family_for
from heapr_serve.progress import console, progress_bar
from heapr_serve.quantize.schemes import SCHEMES


def _standalone_gptq(folder: Path, out: Path, calib, nsamples: int, seq_len: int, batch_size: int, seed: int, device: str, stack):
    """`quantize --method gptq` on a dense folder: its calibration batches, and the GPTQ pass over it."""
    from heapr_serve.calibrate.datasets import load_calibration
    from heapr_serve.checkpoint.source import SourceCheckpoint
    from heapr_serve.models import load_tokenizer, pick_device
    from heapr_serve.prune.reconstruct import temporary_folder
    from heapr_serve.quantize.after_pruning import QuantizeRun, gptq_calibration
    from heapr_serve.quantize.options import QuantizeOptions
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
        from heapr_serve.quantize.folder import quantize_folder  # compressed-tensors: when the command runs

        record = quantize_folder(folder, out, scheme, group_size, list(ignore), overwrite, only_experts, calibrate=calibrate)
    saved = 1 - record["weight_bytes_after"] / max(record["weight_bytes_before"], 1)
    console.print(f"wrote {out}: {record['quantized_tensors']} Linear weights quantized to {scheme} "
                  f"({record['weight_bytes_before'] / 2**20:.2f} MiB -> {record['weight_bytes_after'] / 2**20:.2f} MiB, "
                  f"-{saved:.1%}); {record['ignored_modules']} left unquantized; {time.perf_counter() - start:.1f} s",
                  highlight=False)
