"""Real checkpoint layouts through the real `heapr-serve compress`: DeepSeek-V3's MTP layer, FP8
block-quantised sources (DeepSeek-V3 / Qwen3-FP8), gpt-oss's MXFP4 expert stacks, several shards, fused
on-disk experts.

Every case is a tiny random model with the feature (tools/build_tiny_models.py). For each one the
output must validate, load in transformers and compute exactly the dense model with the pruned neurons
zeroed (1e-5 in float32). For an FP8 source "the dense model" is the source dequantised and rounded to
bfloat16, since that is what the output stores (written unquantised; the bf16 rounding alone is
measured and printed). The MTP and FP8 outputs are also served by the real vLLM CPU engine (one
subprocess, three engines).

Over 400 lines: every family's real layout needs its own builder here, and the served cases share
one engine subprocess that a split file would start again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import run_cli
from heapr_serve.checkpoint.format import SCALE_SUFFIX, count_source_params, safetensors_files, tensor_layer
from heapr_serve.checkpoint.source import SourceCheckpoint, dequantize_fp8, load_dense
from heapr_serve.checkpoint.validate import validate_checkpoint
from heapr_serve.checkpoint.writer import estimated_output_bytes
from heapr_serve.errors import HeaprError
from heapr_serve.families import moe_blocks
from heapr_serve.prune.methods import expert_weight_norms, plan_for_method
from heapr_serve.prune.options import PruneOptions
from heapr_serve.score.stats import SCORES_FILE, ExpertStats
from model_patches.transformers.loader import RaggedExperts
from tests.helpers.mxfp4 import decode, write_dequantised, write_mxfp4
from tests.helpers.ragged import zero_pruned_neurons
from tests.helpers.vllm_driver import run_engines
from tools.build_tiny_models import build_tiny_model

FAST = ["--nsamples", "8", "--seq-len", "32", "--batch-size", "4"]
MiB = 1 << 20

# name -> (family, builder options); initializer_range 0.1 so that pruning visibly moves the logits
SOURCES = {
    "deepseek_v3-fp8-mtp": ("deepseek_v3", dict(mtp_layers=1, fp8_block=(128, 128), shard_bytes=MiB)),  # DeepSeek-V3 as shipped
    "deepseek_v3-mtp-fused": ("deepseek_v3", dict(mtp_layers=1, fused_experts=True, shard_bytes=MiB)),
    "qwen3_moe-fp8": ("qwen3_moe", dict(fp8_block=(48, 48))),  # partial edge blocks in both directions
    "qwen3_moe-fused-sharded": ("qwen3_moe", dict(fused_experts=True, shard_bytes=MiB)),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("real-sources")
    return {name: build_tiny_model(family, root / name, seed=20 + i, tok=tiny_tokenizer, initializer_range=0.1, **opts)
            for i, (name, (family, opts)) in enumerate(SOURCES.items())}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, sources):
    """Each source through `heapr-serve compress` once: name -> (output folder, stderr)."""
    root = tmp_path_factory.mktemp("real-pruned")
    results = {}
    for name, source in sources.items():
        out = root / name
        code, stdout, err = run_cli("compress", source, "-o", out, "--ratio", "0.3", *FAST)
        assert code == 0, err[-3000:]
        results[name] = (out, err + stdout)
    return results


def _plan(out: Path):
    """The plan `compress` wrote, recomputed from the saved scores (and checked against the config)."""
    heapr = json.loads((out / "config.json").read_text())["heapr"]
    stats = ExpertStats.load(out / SCORES_FILE)
    options = PruneOptions(heapr["ratio"], heapr["method"], heapr["scope"], heapr["align"], heapr["keep_unrouted"], heapr.get("seed", 0))
    plan = plan_for_method(stats, Path(heapr["source_model"]), options)
    assert {str(k): v for k, v in plan.widths.items()} == heapr["expert_widths"]
    return plan


def _as_written(source: Path) -> torch.nn.Module:
    """The dense source as the pruned output stores it, in float32: FP8 weights dequantised and rounded
    to bfloat16 (the other weights of an FP8 source are bfloat16 already; buffers stay as they are)."""
    model = load_dense(source, torch.float32, "cpu")
    if SourceCheckpoint(source).fp8_block is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    return model.eval()


_zero_pruned = zero_pruned_neurons


def _header_params(folder: Path, layers_from: int) -> int:
    total = 0
    for file in sorted(set(safetensors_files(folder).values())):
        with safe_open(folder / file, "pt") as f:
            for name in f.keys():
                layer = tensor_layer(name)
                if layer is not None and layer >= layers_from:
                    total += torch.Size(f.get_slice(name).get_shape()).numel()
    return total


IDS = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", list(SOURCES))
def test_compress_output_validates_loads_and_computes_the_pruned_function(compressed, sources, name):
    source, (out, log) = sources[name], compressed[name]
    src = SourceCheckpoint(source)
    config = json.loads((out / "config.json").read_text())
    heapr = config["heapr"]
    ckpt = validate_checkpoint(out)
    n_layers = config["num_hidden_layers"]

    # MTP: kept whole and declared; its tensors are the source's, experts per-expert at the dense width
    if src.extra_layers:
        assert heapr["kept_whole_layers"] == {str(n_layers): "MTP (num_nextn_predict_layers), not calibrated"}
        assert ckpt.kept_whole == {n_layers: heapr["kept_whole_layers"][str(n_layers)]}
        assert config["num_nextn_predict_layers"] == 1
        mtp = load_dense_mtp(src, n_layers)
        written = {n: t for n, t in _all(out).items() if tensor_layer(n) == n_layers}
        assert set(written) == set(mtp)
        for n, t in mtp.items():
            assert torch.equal(written[n], t), n
    else:
        assert "kept_whole_layers" not in heapr

    # FP8: dequantised to bfloat16, no scales, no quantization_config, recorded, one-line note
    tensors = _all(out)
    assert not any(n.endswith(SCALE_SUFFIX) or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for n, t in tensors.items())
    assert "quantization_config" not in config
    if src.fp8_block is not None:
        assert config["dtype"] == "bfloat16"
        q = heapr["source_quantization"]
        assert q["quant_method"] == "fp8" and q["weight_block_size"] == list(src.fp8_block) and q["written_as"] == "bfloat16"
        assert q["dequantised_tensors"] == sum(n.endswith(SCALE_SUFFIX) for n in src.files)
        assert sum("dequantised to bfloat16" in line for line in log.splitlines()) == 1
        # an attention weight: exactly bf16(W_fp8 * scale) over partial edge blocks
        attn = next(n for n in tensors if "self_attn" in n and n.endswith("proj.weight") and n + SCALE_SUFFIX in src.files)
        with safe_open(source / src.files[attn], "pt") as f:
            fp8 = f.get_tensor(attn)
        assert fp8.dtype == torch.float8_e4m3fn
        scale = src.read([attn + SCALE_SUFFIX])[attn + SCALE_SUFFIX]
        assert torch.equal(tensors[attn], dequantize_fp8(fp8, scale, src.fp8_block).to(torch.bfloat16))
        for n, t in tensors.items():  # e_score_correction_bias stays float32
            if n.endswith("e_score_correction_bias"):
                assert t.dtype == torch.float32
    else:
        assert "source_quantization" not in heapr

    # transformers: exactly the dense function with the pruned neurons zeroed
    plan = _plan(out)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(isinstance(b.experts, RaggedExperts) for b in moe_blocks(pruned).values())
    mtp_params = _header_params(out, n_layers)
    assert sum(t.numel() for t in pruned.state_dict().values()) == heapr["pruned_params"] - mtp_params
    reference = _zero_pruned(_as_written(source), plan)
    with torch.no_grad():
        got, want = pruned(input_ids=IDS).logits, reference(input_ids=IDS).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    if src.fp8_block is not None:
        _print_bf16_cost(name, source, plan, got)


def _print_bf16_cost(name, source, plan, written_logits):
    """What writing the dequantised weights in bfloat16 costs, against the exact float32 dequantisation,
    next to what merely computing the same model in bfloat16 costs: no more than that (median)."""
    exact = _zero_pruned(load_dense(source, torch.float32, "cpu"), plan).eval()
    in_bf16 = _zero_pruned(load_dense(source, torch.bfloat16, "cpu"), plan).eval()
    with torch.no_grad():
        want = torch.log_softmax(exact(input_ids=IDS).logits, -1)
        written = (torch.log_softmax(written_logits, -1) - want).abs()
        computed = (torch.log_softmax(in_bf16(input_ids=IDS).logits.float(), -1) - want).abs()
    top5 = want.topk(5, -1).indices
    print(f"{name}: |log-prob| change from writing bf16: median {written.median():.1e}, top-5 max "
          f"{written.gather(-1, top5).max():.2f}; from computing in bf16: median {computed.median():.1e}, "
          f"top-5 max {computed.gather(-1, top5).max():.2f}")
    assert written.median() <= computed.median()


def _all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(set(safetensors_files(folder).values())):
        out.update(load_file(folder / file))
    return out


def load_dense_mtp(src: SourceCheckpoint, layer: int) -> dict[str, torch.Tensor]:
    """The source's MTP-layer tensors as the output must hold them: dequantised to bf16 (FP8), routed
    experts per-expert at the dense width (fused on disk)."""
    names = [n for n in src.files if tensor_layer(n) == layer and not n.endswith(SCALE_SUFFIX)]
    tensors = src.read(names)
    out = {}
    for n, t in tensors.items():
        if src.fp8_block is not None and n + SCALE_SUFFIX in src.files:
            t = t.to(torch.bfloat16)
        if n.endswith("experts.gate_up_proj"):
            width = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[n.replace("gate_up_proj", f"{e}.gate_proj.weight")] = t[e, :width]
                out[n.replace("gate_up_proj", f"{e}.up_proj.weight")] = t[e, width:]
        elif n.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[n.replace("down_proj", f"{e}.down_proj.weight")] = t[e]
        else:
            out[n] = t
    return out


def test_sources_have_the_layouts_they_claim(sources):
    """The fixtures are what they say: several shards, fused stacks on disk, FP8 weights whose scales
    sit in other shards, partial edge blocks, an MTP layer."""
    ds = SourceCheckpoint(sources["deepseek_v3-fp8-mtp"])
    assert len(set(ds.files.values())) > 2 and ds.extra_layers == [3] and ds.fp8_block == (128, 128)
    assert any(ds.files[n] != ds.files[n + SCALE_SUFFIX] for n in ds.files if n + SCALE_SUFFIX in ds.files)
    kv = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # [576, 128]: 4.5 blocks of 128 rows
    assert list(ds.read([kv + SCALE_SUFFIX])[kv + SCALE_SUFFIX].shape) == [5, 1]
    assert {"model.layers.3.enorm.weight", "model.layers.3.hnorm.weight", "model.layers.3.eh_proj.weight",
            "model.layers.3.shared_head.norm.weight", "model.layers.3.shared_head.head.weight",
            "model.layers.3.mlp.experts.7.down_proj.weight"} <= set(ds.files)
    fused = SourceCheckpoint(sources["qwen3_moe-fused-sharded"])
    assert len(set(fused.files.values())) > 2 and "model.layers.1.mlp.experts.gate_up_proj" in fused.files
    assert not any(".experts.0." in n for n in fused.files)
    q = SourceCheckpoint(sources["qwen3_moe-fp8"])
    expert = "model.layers.0.mlp.experts.0.gate_proj.weight"  # [64, 128] in 48x48 blocks: [2, 3]
    assert list(q.read([expert + SCALE_SUFFIX])[expert + SCALE_SUFFIX].shape) == [2, 3]


def test_magnitude_baseline_reads_fp8_weights_dequantised(sources):
    source = sources["qwen3_moe-fp8"]
    norms = expert_weight_norms(source, {0, 1})
    dense = load_dense(source, torch.float32, "cpu")
    experts = dense.model.layers[1].mlp.experts
    width = experts.down_proj.shape[-1]
    assert torch.allclose(norms[1]["gate"], experts.gate_up_proj[:, :width].norm(dim=2), rtol=1e-5)
    assert torch.allclose(norms[1]["down"], experts.down_proj.norm(dim=1), rtol=1e-5)


def test_drop_mtp_and_apply_from_another_directory(tmp_path, sources, capsys, monkeypatch):
    """Compress with relative paths, then `apply --drop-mtp` from elsewhere: the recorded source is
    absolute, and the MTP layer is gone (its tensors and num_nextn_predict_layers)."""
    source = sources["deepseek_v3-mtp-fused"]
    work, other = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    other.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run_cli("compress", os.path.relpath(source, work), "-o", "p30", "--ratio", "0.3", *FAST, capsys=capsys)
    assert code == 0, err
    heapr = json.loads((work / "p30" / "config.json").read_text())["heapr"]
    assert heapr["source_model"] == str(source.resolve()) == ExpertStats.load(work / "p30" / SCORES_FILE).metadata["source_model"]

    monkeypatch.chdir(other)
    code, _, err = run_cli("apply", work / "p30", "-o", "p50", "--ratio", "0.5", "--drop-mtp", capsys=capsys)
    assert code == 0, err
    out = other / "p50"
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and "kept_whole_layers" not in config["heapr"]
    assert config["heapr"]["dropped_layers"] == {"3": "MTP (num_nextn_predict_layers), dropped by --drop-mtp"}
    assert config["heapr"]["source_model"] == str(source.resolve())
    assert not [n for n in safetensors_files(out) if tensor_layer(n) == 3]
    validate_checkpoint(out)
    plan = _plan(out)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(t.numel() for t in pruned.state_dict().values()) == config["heapr"]["pruned_params"]
    reference = _zero_pruned(_as_written(source), plan)
    with torch.no_grad():
        got, want = pruned(input_ids=IDS).logits, reference(input_ids=IDS).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_score_correction_bias_stays_float32_in_bfloat16(compressed, sources):
    """DeepSeek-V3 keeps `e_score_correction_bias` in float32 (`_keep_in_fp32_modules_strict`): so do
    the pruned loader and the dense FP8 reader when the model loads in bfloat16."""
    out, _ = compressed["deepseek_v3-fp8-mtp"]
    source_bias = {n: t for n, t in _all(sources["deepseek_v3-fp8-mtp"]).items()
                   if n.endswith("e_score_correction_bias") and tensor_layer(n) < 3}
    assert source_bias and all(t.dtype == torch.float32 for t in source_bias.values())
    for model in (AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16),
                  load_dense(sources["deepseek_v3-fp8-mtp"], torch.bfloat16, "cpu")):
        buffers = dict(model.named_buffers())
        for n, t in source_bias.items():
            assert buffers[n].dtype == torch.float32 and torch.equal(buffers[n], t), n
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=IDS).logits).all()


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _wrong_scale(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"
    tensors[name] = tensors[name][:1]
    save_file(tensors, folder / "model.safetensors")


BAD = {
    "fp8 without weight_block_size": ("qwen3_moe-fp8", lambda f: _edit_config(f, lambda c: c["quantization_config"].pop("weight_block_size")),
                                      ["weight_block_size", "config.json"]),
    "static activation scales": ("qwen3_moe-fp8", lambda f: _edit_config(f, lambda c: c["quantization_config"].update(activation_scheme="static")),
                                 ["activation_scheme"]),
    "another quantisation": ("qwen3_moe-fp8", lambda f: _edit_config(f, lambda c: c.update(quantization_config={"quant_method": "gptq"})),
                             ["gptq", "not supported"]),
    "MXFP4 on a family other than gpt-oss": ("qwen3_moe-fp8", lambda f: _edit_config(f, lambda c: c.update(quantization_config={"quant_method": "mxfp4"})),
                                             ["'mxfp4'", "gpt-oss only", "qwen3_moe", "config.json"]),
    "scales that do not match": ("qwen3_moe-fp8", _wrong_scale, ["experts.1.up_proj.weight_scale_inv", "[1, 3]", "[2, 3]"]),
    "scales without fp8 config": ("qwen3_moe-fp8", lambda f: _edit_config(f, lambda c: c.pop("quantization_config")),
                                  ["_scale_inv", "no fp8 quantization_config"]),
    "layer the config does not declare": ("deepseek_v3-mtp-fused", lambda f: _edit_config(f, lambda c: c.update(num_nextn_predict_layers=0)),
                                          ["model.layers.3.", "num_hidden_layers 3"]),
}


def _compress_is_refused(tmp_path, source, tamper, needles, capsys) -> None:
    """A tampered copy of `source`: `compress` says one line with every needle, and writes nothing."""
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    tamper(bad)
    out = tmp_path / "o"
    code, _, err = run_cli("compress", bad, "-o", out, *FAST, capsys=capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_real_checkpoints_are_one_line_and_leave_nothing(tmp_path, sources, capsys, case):
    name, tamper, needles = BAD[case]
    _compress_is_refused(tmp_path, sources[name], tamper, needles, capsys)


# --- MXFP4 sources (gpt-oss as released) ------------------------------------------------------------

@pytest.fixture(scope="module")
def mxfp4_sources(tmp_path_factory, tiny_tokenizer):
    """A tiny gpt-oss in the released MXFP4 layout (tests/helpers/mxfp4.py) and its dequantised bfloat16
    copy. intermediate_size 96: every blocked axis a multiple of 32, and H (128), 2I (192) and I all
    different, so a swapped axis cannot pass the shape checks."""
    root = tmp_path_factory.mktemp("mxfp4")
    dense = build_tiny_model("gpt_oss", root / "float", seed=7, tok=tiny_tokenizer, intermediate_size=96)
    mxfp4 = write_mxfp4(dense, root / "mxfp4")
    return {"mxfp4": mxfp4, "dequantised": write_dequantised(mxfp4, root / "dequantised")}


@pytest.mark.parametrize("mode", ["in-memory", "streamed"])
def test_mxfp4_source_compresses_exactly_like_its_dequantised_copy(tmp_path, mxfp4_sources, capsys, mode):
    """Same HEAPr statistics, same pruned tensors: the MXFP4 reader is the dequantisation, nothing more.
    The output is unquantised bfloat16 without the source's quantization_config (recorded instead)."""
    flags = ["--nsamples", "4", "--seq-len", "16", "--batch-size", "4", "--ratio", "0.3", "--streamed" if mode == "streamed" else "--no-streamed"]
    outs = {}
    for name, source in mxfp4_sources.items():
        outs[name] = tmp_path / name
        code, stdout, err = run_cli("compress", source, "-o", outs[name], *flags, capsys=capsys)
        assert code == 0, err[-3000:]
        if name == "mxfp4":
            assert sum("MXFP4 expert stacks" in line for line in (stdout + err).splitlines()) == 1
    scores = {n: load_file(o / SCORES_FILE) for n, o in outs.items()}
    assert scores["mxfp4"].keys() == scores["dequantised"].keys()
    for key, value in scores["mxfp4"].items():
        assert torch.equal(value, scores["dequantised"][key]), key
    got, want = _all(outs["mxfp4"]), _all(outs["dequantised"])
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert value.dtype == want[key].dtype == torch.bfloat16 and torch.equal(value, want[key]), key
    config = json.loads((outs["mxfp4"] / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    q = config["heapr"]["source_quantization"]
    assert q["quant_method"] == "mxfp4" and q["written_as"] == "bfloat16"
    assert q["dequantised_tensors"] == 2 * config["num_hidden_layers"]  # gate_up and down per layer
    validate_checkpoint(outs["mxfp4"])


def test_mxfp4_reader_matches_an_independent_decoder(mxfp4_sources):
    """transformers' arithmetic, as the reader uses it, against tests/helpers/mxfp4.py's own decoder; and
    the header-only readers count an MXFP4 stack as its dequantised self."""
    src = SourceCheckpoint(mxfp4_sources["mxfp4"])
    tensors = load_file(mxfp4_sources["mxfp4"] / "model.safetensors")
    stack = "model.layers.1.mlp.experts.down_proj"
    assert src.read_name(stack + "_blocks") == stack and src.read_name(stack + "_scales") is None
    got = src.read([stack + "_blocks"])[stack + "_blocks"]
    assert list(got.shape) == [8, 96, 128]  # transformers' down_proj [E, I, H]
    assert torch.equal(got, decode(tensors[stack + "_blocks"], tensors[stack + "_scales"]))
    # what else reads headers or weights sees the dequantised model: parameter count, output size, magnitudes
    mx, dq = mxfp4_sources["mxfp4"], mxfp4_sources["dequantised"]
    assert count_source_params(mx) == count_source_params(dq)
    assert estimated_output_bytes(mx, 0.3) == estimated_output_bytes(dq, 0.3)
    norms, want = expert_weight_norms(mx, {0, 1}), expert_weight_norms(dq, {0, 1})
    for layer in (0, 1):
        for proj in ("gate", "up", "down"):
            assert torch.equal(norms[layer][proj], want[layer][proj]), (layer, proj)


def _edit_tensors(edit):
    def tamper(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors")
    return tamper


BAD_MXFP4 = {
    "scales of the wrong shape": (_edit_tensors(lambda t: t.update({"model.layers.1.mlp.experts.gate_up_proj_scales":
                                                                    t["model.layers.1.mlp.experts.gate_up_proj_scales"][:, :, :2].contiguous()})),
                                  ["model.layers.1.mlp.experts.gate_up_proj_scales", "[8, 192, 2]", "[8, 192, 4]", "model.safetensors"]),
    "missing scales": (_edit_tensors(lambda t: t.pop("model.layers.0.mlp.experts.down_proj_scales")),
                       ["model.layers.0.mlp.experts.down_proj_blocks", "down_proj_scales", "model.safetensors"]),
    "blocks without the mxfp4 config": (lambda f: _edit_config(f, lambda c: c.pop("quantization_config")),
                                        ["_blocks", "part of an MXFP4 stack", "no mxfp4 quantization_config"]),
}


@pytest.mark.parametrize("case", list(BAD_MXFP4))
def test_malformed_mxfp4_sources_are_one_line(tmp_path, mxfp4_sources, capsys, case):
    tamper, needles = BAD_MXFP4[case]
    _compress_is_refused(tmp_path, mxfp4_sources["mxfp4"], tamper, needles, capsys)


# --- the real vLLM CPU engine --------------------------------------------------------------------

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The mixture of experts layer routes each token",
           "Water boils at a temperature of"]
MAX_TOKENS = 8
FP32_TOL = 2e-3


@pytest.fixture(scope="module")
def served(tmp_path_factory, compressed, tiny_tokenizer):
    """vLLM (float32) on the FP8+MTP DeepSeek-V3 output, the stock model on its zero-padded dense
    equivalent (DeepSeek's reference: stock vLLM and transformers disagree on the tiny MLA model even
    dense, see test_vllm_serving.py), and the Qwen3-FP8 output. One subprocess, three engines."""
    pytest.importorskip("vllm")
    from tests.helpers.ragged import zero_padded_dense

    root = tmp_path_factory.mktemp("real-vllm")
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
    folders = {"deepseek": compressed["deepseek_v3-fp8-mtp"][0], "qwen3": compressed["qwen3_moe-fp8"][0]}
    folders["deepseek-zeropad"] = zero_padded_dense(folders["deepseek"], root / "deepseek-zeropad")
    runs = [{"key": k, "model": str(f), "dtype": "float32", "prompts": prompts, "max_tokens": MAX_TOKENS} for k, f in folders.items()]
    done, log = run_engines(runs, root, timeout=600)
    results = {spec["key"]: r for spec, r in zip(runs, done)}
    return {"folders": folders, "results": results, "prompts": prompts, "log": log}


def _top5(result):
    assert "error" not in result, result.get("error")
    for i, (tokens, steps) in enumerate(zip(result["tokens"], result["logprobs"])):
        assert len(tokens) == MAX_TOKENS
        for pos, (token, step) in enumerate(zip(tokens, steps)):
            yield i, pos, token, dict(sorted(step.items(), key=lambda kv: -kv[1])[:5])


def _teacher_forced(model, prompt, continuation):
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(continuation)]
    return torch.log_softmax(logits.float(), -1)


def test_vllm_serves_fp8_qwen3_output_like_transformers(served, sources):
    folder, result = served["folders"]["qwen3"], served["results"]["qwen3"]
    pruned = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    dense = _as_written(sources["qwen3_moe-fp8"])
    worst, separation = 0.0, 0.0
    refs = [_teacher_forced(pruned, p, t) for p, t in zip(served["prompts"], result["tokens"])]
    for i, pos, token, top5 in _top5(result):
        ref = refs[i][pos]
        assert float(ref.max() - ref[token]) <= FP32_TOL, f"prompt {i} pos {pos}: vLLM's greedy token is not transformers' argmax"
        worst = max(worst, max(abs(lp - float(ref[int(t)])) for t, lp in top5.items()))
    for p, t, ref in zip(served["prompts"], result["tokens"], refs):
        separation = max(separation, float((ref - _teacher_forced(dense, p, t)).abs().max()))
    assert worst <= FP32_TOL, worst
    assert separation > 0.1, separation
    print(f"qwen3_moe FP8 source, pruned: vLLM vs transformers max top-5 deviation {worst:.1e}; dense vs pruned {separation:.2f}")


def test_vllm_serves_fp8_mtp_deepseek_output(served, sources):
    result, ref = served["results"]["deepseek"], served["results"]["deepseek-zeropad"]
    assert "heapr-serve: skipped the tensors of layers [3]" in served["log"]  # the MTP layer, kept whole on disk
    assert result["tokens"] == ref["tokens"]
    worst = 0.0
    for (_, _, _, mine), (_, _, _, theirs) in zip(_top5(result), _top5(ref)):
        common = set(mine) & set(theirs)
        assert len(common) >= 4
        worst = max(worst, max(abs(mine[t] - theirs[t]) for t in common))
    assert worst <= FP32_TOL, worst
    pruned = AutoModelForCausalLM.from_pretrained(served["folders"]["deepseek"], dtype=torch.float32).eval()
    dense = _as_written(sources["deepseek_v3-fp8-mtp"])
    separation = max(float((_teacher_forced(pruned, p, t) - _teacher_forced(dense, p, t)).abs().max())
                     for p, t in zip(served["prompts"], result["tokens"]))
    assert separation > 0.1, separation
    print(f"deepseek_v3 FP8+MTP source, pruned: vLLM vs stock vLLM on the zero-padded equivalent, max top-5 "
          f"deviation {worst:.1e}; dense vs pruned {separation:.2f}")


def test_pruned_folder_with_undeclared_or_quantised_parts_is_refused(tmp_path, compressed, capsys):
    """The validator (every loader's first step) refuses an MTP layer the `heapr` section does not
    declare, a kept-whole expert that is not at the dense width, and leftover FP8 parts."""
    out, _ = compressed["deepseek_v3-fp8-mtp"]

    def copy_with(edit):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, bad)
        _edit_config(bad, edit)
        return bad

    undeclared = copy_with(lambda c: c["heapr"].pop("kept_whole_layers"))
    with pytest.raises(HeaprError, match=r"model\.layers\.3\..* is for layer 3 .*kept_whole_layers does not list"):
        AutoModelForCausalLM.from_pretrained(undeclared)
    quantised = copy_with(lambda c: c.update(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}))
    with pytest.raises(HeaprError, match="not the compressed-tensors"):
        validate_checkpoint(quantised)

    narrow = copy_with(lambda c: None)
    name = "model.layers.3.mlp.experts.5.gate_proj.weight"
    file = narrow / safetensors_files(narrow)[name]
    tensors = load_file(file)
    tensors[name] = tensors[name][:32]
    save_file(tensors, file)
    with pytest.raises(HeaprError, match=r"experts\.5\.gate_proj\.weight has shape \[32, 128\] but layer 3 is kept whole"):
        validate_checkpoint(narrow)
    code, _, err = run_cli("inspect", out, capsys=capsys)
    assert code == 0 and "layer 3 kept whole" in err and "dequantised to bfloat16" in err


@pytest.mark.parametrize("name", list(SOURCES))
def test_streamed_compress_of_real_checkpoints_equals_in_memory(tmp_path, sources, compressed, name):
    """FP8 scales in other shards, MTP layers and fused stacks on disk, read layer by layer: the same
    statistics and widths as the in-memory pass (which `compressed` ran)."""
    out = tmp_path / "streamed"
    code, _, err = run_cli("compress", sources[name], "-o", out, "--ratio", "0.3", "--streamed", *FAST)
    assert code == 0, err[-3000:]
    assert "streamed layer by layer" in err
    assert _plan(out).widths == _plan(compressed[name][0]).widths
    a, b = ExpertStats.load(compressed[name][0]), ExpertStats.load(out)
    for layer in a.act_sq:
        assert torch.equal(a.tokens[layer], b.tokens[layer])
        for kind in ("act_sq", "grad_sq", "fisher"):
            x, y = getattr(a, kind)[layer].double(), getattr(b, kind)[layer].double()
            assert ((x - y).abs() / x.abs().clamp(min=1e-30)).max() < 1e-4, (layer, kind)
