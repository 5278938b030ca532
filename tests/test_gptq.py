"""GPTQ: `compress --quantize`, `apply --quantize` and `quantize --method gptq`.

Checked: GPTQ of one weight lowers the calibration output error below round-to-nearest's for every
scheme, and its tensors decompress (compressed-tensors' own code) onto its grid values; with no
calibration signal it is round-to-nearest exactly. On the bundled model: pruned 25 % + GPTQ w4a16
costs at most half of RTN's perplexity increase over the pruned bf16 model (measured in-process by
`eval`, which now reads quantized folders); streamed and in-memory GPTQ write the same tensors;
`quantize --method gptq` beats RTN on the dense model and refuses a pruned folder in one line; the
group is chosen to fit the widths, and every bad --quantize flag is refused in one line before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import heapr_serve  # noqa: F401
from heapr_serve.checkpoint.validate import validate_checkpoint
from heapr_serve.eval.perplexity import eval_tokens, perplexity
from heapr_serve.models import load_model, load_tokenizer
from heapr_serve.quantize.gptq import gptq_weight
from heapr_serve.quantize.rtn import dequantize_weight, pack_weight, quantize_weight
from heapr_serve.quantize.schemes import SCHEMES, scheme_for

from conftest import EXAMPLE_MODEL, run_cli

CALIB = ["--nsamples", "32", "--seq-len", "128"]


@pytest.mark.parametrize("name", list(SCHEMES))
def test_gptq_lowers_the_output_error_and_packs_onto_its_grid(name):
    torch.manual_seed(0)
    x = torch.randn(2048, 128) @ (torch.randn(128, 128) * 0.3 + torch.eye(128))
    w = (torch.randn(48, 128) * 0.05).to(torch.bfloat16)
    spec = scheme_for(name)
    scheme = spec.build(32 if spec.build(None).weights.group_size else None)
    q, scale, zero = gptq_weight(w, x.t() @ x, scheme)
    stored = dequantize_weight(pack_weight(q, scale, zero, scheme, spec.format), scheme, spec.format)
    rtn = dequantize_weight(quantize_weight(w, scheme, spec.format), scheme, spec.format)

    def error(v):
        return float((x @ (w.float() - v).t()).pow(2).sum())
    assert error(stored) < 0.8 * error(rtn), (error(stored), error(rtn))
    # what is stored is GPTQ's grid value (q - z) * s, rounded to the scale's dtype as decompression computes it
    assert torch.equal(stored, q.to(scale.dtype).float())
    # no calibration signal: round to nearest, bit for bit
    none, _, _ = gptq_weight(w, torch.zeros(128, 128), scheme)
    assert torch.equal(dequantize_weight(pack_weight(none, scale, zero, scheme, spec.format), scheme, spec.format), rtn)


def _ppl(folder: Path) -> float:
    tokens, _ = eval_tokens(load_tokenizer(folder), None)
    return perplexity(load_model(folder, torch.float32, torch.device("cpu")), tokens, max_tokens=4096)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    folders = {}
    for name, flags in {"bf16": ["--align", "16"], "rtn": ["--quantize", "w4a16", "--quant-method", "rtn"],
                        "gptq": ["--quantize", "w4a16"]}.items():
        code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", root / name, "--ratio", "0.25", *CALIB, *flags)
        assert code == 0, err[-3000:]
        folders[name] = root / name
    return root, folders


def test_pruned_gptq_w4a16_costs_at_most_half_of_rtn(pruned):
    _, folders = pruned
    for name in ("rtn", "gptq"):
        validate_checkpoint(folders[name])
        q = json.loads((folders[name] / "config.json").read_text())["heapr"]
        assert q["align"] == 16 and q["quantization"]["group_size"] == 16  # the group that fits width 64, widths aligned to it
        assert q["quantization"]["method"].startswith("GPTQ" if name == "gptq" else "round-to-nearest")
    ppl = {name: _ppl(folder) for name, folder in folders.items()}
    assert ppl["gptq"] - ppl["bf16"] <= 0.5 * (ppl["rtn"] - ppl["bf16"]), ppl
    assert (folders["gptq"] / "heapr_scores.safetensors").is_file()  # apply can re-prune the quantized output


def test_streamed_gptq_writes_the_same_tensors(pruned, tmp_path):
    _, folders = pruned
    code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", tmp_path / "s", "--ratio", "0.25", *CALIB, "--quantize", "w4a16", "--streamed")
    assert code == 0, err[-3000:]
    a, b = (load_file(next(f.glob("model*.safetensors"))) for f in (folders["gptq"], tmp_path / "s"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=float(a[k].abs().max()) * 2**-7 if a[k].is_floating_point() else 0)


def test_hessians_summed_one_expert_at_a_time_give_the_same_tensors(pruned, tmp_path, monkeypatch):
    """The routed experts' Hessians are summed in chunks that fit a tenth of the layer (the streamed
    memory bound); the chunking must not change a single value: one expert per chunk (a pass over
    the layer's inputs for each) writes exactly what the default chunks wrote; here a third of the
    experts per chunk (three passes per layer, to keep the suite short), and a tiny budget gives one."""
    import heapr_serve.quantize.gptq_pass as gptq_pass

    _, folders = pruned
    chunks = []
    real = gptq_pass.experts_per_chunk
    assert real(torch.nn.Linear(4, 4), 64, 1024, 512, budget=1) == 1 and real(torch.nn.Linear(4, 4), 0, 0, 0) == 1
    monkeypatch.setattr(gptq_pass, "experts_per_chunk",
                        lambda module, num_experts, *a, **k: chunks.append((num_experts, max(1, num_experts // 3))) or chunks[-1][1])
    code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", tmp_path / "c", "--ratio", "0.25", *CALIB, "--quantize", "w4a16")
    assert code == 0, err[-3000:]
    assert chunks and all(1 < c < n for n, c in chunks if n), chunks  # every MoE layer in three chunks
    a, b = (load_file(next(f.glob("model*.safetensors"))) for f in (folders["gptq"], tmp_path / "c"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_apply_quantize_equals_compress_quantize(pruned, tmp_path):
    _, folders = pruned
    code, _, err = run_cli("apply", folders["bf16"], "-o", tmp_path / "a", "--ratio", "0.25", "--quantize", "w4a16")
    assert code == 0, err[-3000:]
    a, b = (load_file(next(f.glob("model*.safetensors"))) for f in (folders["gptq"], tmp_path / "a"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_method_gptq_beats_rtn_on_the_dense_model_and_refuses_a_pruned_folder(pruned, tmp_path):
    root, folders = pruned
    for method in ("rtn", "gptq"):
        code, _, err = run_cli("quantize", EXAMPLE_MODEL, "-o", tmp_path / method, "--method", method, *CALIB)
        assert code == 0, err[-3000:]
    assert _ppl(tmp_path / "gptq") < _ppl(tmp_path / "rtn")
    code, _, err = run_cli("quantize", folders["bf16"], "-o", tmp_path / "x", "--method", "gptq")
    assert code == 2 and "apply" in err and "--quantize" in err and len(err.strip().splitlines()) <= 3
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags, says", [
    (["--quantize", "int3"], "--quantize"),
    (["--quantize", "w4a16", "--quant-method", "awq"], "--quant-method"),
    (["--quantize", "w4a16", "--quant-group-size", "12"], "--quant-group-size"),
    (["--quant-group-size", "12"], "--quant-group-size"),  # checked with or without --quantize
    (["--quantize", "w4a16", "--quant-group-size", "32", "--align", "16"], "--align"),
    (["--quantize", "fp8-block", "--quant-group-size", "32"], "--quant-group-size"),
])
def test_bad_quantize_flags_are_refused_in_one_line(tmp_path, flags, says):
    code, _, err = run_cli("compress", EXAMPLE_MODEL, "-o", tmp_path / "x", *flags)
    assert code == 2 and says in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    assert not (tmp_path / "x").exists()


def test_quantize_refuses_gpt_oss_before_any_work(tiny_models, tmp_path):
    code, _, err = run_cli("compress", tiny_models["gpt_oss"], "-o", tmp_path / "x", "--quantize", "w4a16")
    assert code == 2 and "--quantize" in err and "gpt_oss" in err and len(err.strip().splitlines()) <= 2
    code, _, err = run_cli("quantize", tiny_models["gpt_oss"], "-o", tmp_path / "y", "--method", "gptq")
    assert code == 2 and "gptq" in err and len(err.strip().splitlines()) <= 2
