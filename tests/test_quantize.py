"""`heapr-serve quantize`: the ecosystem's compressed-tensors format, for dense and pruned folders.

No engine here (tests/test_vllm_quantized.py serves the folders). Checked: every scheme's tensors
decompress, with compressed-tensors' own code, to within the scheme's rounding of the source; the
config is a compressed-tensors `quantization_config` that its parser accepts, ignoring the routers
and the LM head; a pruned folder's quantized experts take exactly the kept share of the dense
folder's quantized expert bytes; widths the scheme's groups do not divide are refused naming
--align; and every malformed quantized folder is refused in one line by the validator.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_cli
from heapr_serve.checkpoint.format import PER_EXPERT_TENSOR
from heapr_serve.checkpoint.validate import validate_checkpoint
from heapr_serve.errors import HeaprError
from heapr_serve.quantize.schemes import SCHEMES
from tests.helpers.quantized import dequantized_copy
from tests.helpers.ragged import aligned_widths, make_ragged, mixed_widths


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("quantize")
    dense = tiny_models["qwen3_moe"]
    pruned = make_ragged(dense, root / "pruned", aligned_widths, seed=3)
    return {"root": root, "dense": dense, "pruned": pruned, "ragged": make_ragged(dense, root / "ragged", mixed_widths, seed=3)}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def _quantize(src: Path, out: Path, *args: str) -> Path:
    code, stdout, err = run_cli("quantize", src, "-o", out, *args)
    assert code == 0, err
    return out


# The scheme's worst-case rounding relative to a group's largest |weight|: half a step of the grid.
REL_TOL = {"w4a16": 1 / 14 + 1e-3, "w4a16-asym": 1 / 30 + 1e-2, "w8a16": 1 / 254 + 1e-3, "w8a8": 1 / 254 + 1e-3,
           "fp8": 1 / 16 + 1e-3, "fp8-block": 1 / 16 + 1e-3}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_writes_compressed_tensors_that_decompress_to_the_source(folders, scheme):
    from compressed_tensors.quantization import QuantizationConfig

    group = [] if scheme in ("w8a8", "fp8", "fp8-block") else ["--group-size", "32"]
    out = _quantize(folders["dense"], folders["root"] / f"dense-{scheme}", "--scheme", scheme, *group)
    config = json.loads((out / "config.json").read_text())
    parsed = QuantizationConfig.model_validate(config["quantization_config"])  # the library's own parser
    assert parsed.quant_method == "compressed-tensors" and parsed.quantization_status == "compressed"
    assert set(config["quantization_config"]["ignore"]) == {"lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    assert config["heapr_quantization"]["scheme"] == scheme and "heapr" not in config

    source = _tensors(folders["dense"])
    back = dequantized_copy(out, folders["root"] / f"dense-{scheme}-back")
    restored = _tensors(back)
    assert set(restored) == set(source)
    quantized = [n for n in source if n.endswith(".weight") and source[n].dim() == 2
                 and "embed" not in n and not n.endswith(("mlp.gate.weight", "lm_head.weight"))]
    assert len(quantized) == config["heapr_quantization"]["quantized_tensors"] > 0
    for name, t in source.items():
        if name not in quantized:
            assert torch.equal(restored[name], t), name  # everything else is carried bit for bit
            continue
        err = (restored[name] - t.float()).abs().max() / t.float().abs().max()
        assert 0 < err <= REL_TOL[scheme] * 2, (name, float(err))
    card = (out / "README.md").read_text()
    assert f"--scheme {scheme}" in card and "quantized Linear weights" in card


def test_pruned_quantized_experts_take_the_kept_share_of_the_dense_bytes(folders):
    dense_q = _quantize(folders["dense"], folders["root"] / "bytes-dense", "--scheme", "w4a16", "--group-size", "32")
    pruned_q = _quantize(folders["pruned"], folders["root"] / "bytes-pruned", "--scheme", "w4a16", "--group-size", "32")
    ckpt = validate_checkpoint(pruned_q)  # every quantized part checked against the widths
    assert ckpt.heapr["quantization"]["scheme"] == "w4a16"

    def expert_bytes(folder):
        total = 0
        with safe_open(next(folder.glob("model*.safetensors")), "pt") as f:
            for name in f.keys():
                base, part = name.rsplit(".", 1)
                if PER_EXPERT_TENSOR.match(base + ".weight") and part != "weight_shape":
                    t = f.get_tensor(name)
                    total += t.numel() * t.element_size()
        return total

    widths = ckpt.widths
    kept = sum(map(sum, widths.values())) / sum(len(w) * ckpt.dense_width for w in widths.values())
    assert expert_bytes(pruned_q) == pytest.approx(kept * expert_bytes(dense_q), rel=0, abs=0.5)
    code, out, err = run_cli("inspect", pruned_q)
    assert code == 0 and "quantized w4a16" in out + err and "-84." in out + err


def test_widths_the_groups_do_not_divide_are_refused_naming_align(folders):
    code, _, err = run_cli("quantize", folders["ragged"], "-o", folders["root"] / "never", "--scheme", "w4a16", "--group-size", "32")
    assert code == 2 and "--align 32" in err and "Traceback" not in err
    assert not (folders["root"] / "never").exists()
    # per-channel scales have no groups: the same ragged folder quantizes and validates
    out = _quantize(folders["ragged"], folders["root"] / "ragged-w8a8", "--scheme", "w8a8")
    validate_checkpoint(out)


def test_bad_quantize_input_is_one_line(folders):
    root = folders["root"]
    w4 = _quantize(folders["dense"], root / "twice-src", "--scheme", "w4a16", "--group-size", "32")
    for args, says in [
        ([folders["dense"], "-o", root / "x1", "--scheme", "int3"], "--scheme"),
        ([folders["dense"], "-o", root / "x2", "--group-size", "12"], "--group-size"),
        ([folders["dense"], "-o", root / "x3", "--scheme", "fp8-block", "--group-size", "32"], "--group-size"),
        ([folders["dense"], "-o", root / "x4", "--ignore", "(["], "--ignore"),
        ([w4, "-o", root / "x5"], "already"),
        ([root / "missing", "-o", root / "x6"], "not a folder"),
        ([folders["dense"], "-o", folders["dense"] / "inside"], "-o"),
    ]:
        code, _, err = run_cli("quantize", *args)
        assert code == 2 and says in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3, (args, err)
        assert not Path(args[2]).exists() or Path(args[2]) == folders["dense"] / "inside" and not Path(args[2]).exists()


def _broken(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    shutil.copytree(src, dst)
    if edit_tensors:
        file = next(dst.glob("model*.safetensors"))
        tensors = load_file(file)
        edit_tensors(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
        index = dst / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"] = {n: file.name for n in tensors}
        index.write_text(json.dumps(data))
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_every_malformed_quantized_folder_is_refused_in_one_line(folders):
    good = _quantize(folders["pruned"], folders["root"] / "good-w4", "--scheme", "w4a16", "--group-size", "32")
    expert = next(n.rsplit(".", 1)[0] for n in _tensors(good) if n.endswith("experts.0.down_proj.weight_packed"))

    def drop(part):
        return lambda t: t.pop(f"{expert}.{part}")

    def narrow(part):
        return lambda t: t.update({f"{expert}.{part}": t[f"{expert}.{part}"][..., :-1].contiguous()})

    def retype(part, dtype):
        return lambda t: t.update({f"{expert}.{part}": t[f"{expert}.{part}"].to(dtype)})

    cases = {
        "missing scale": (drop("weight_scale"), None, "weight_scale is missing"),
        "missing packed weight": (drop("weight_packed"), None, "weight_packed is missing"),
        "scale groups off": (narrow("weight_scale"), None, "weight_scale has shape"),
        "packed width off": (narrow("weight_packed"), None, "weight_packed has shape"),
        "packed as int8": (retype("weight_packed", torch.int8), None, "not what pack-quantized stores"),
        "float where int": (lambda t: t.update({f"{expert}.weight": torch.zeros(128, 64)}), None, "not part of the pack-quantized"),
        "group size changed": (None, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(group_size=16),
                               "weight_scale has shape"),
        "another method": (None, lambda c: c["quantization_config"].update(quant_method="gptq"), "not the compressed-tensors"),
        "actorder": (None, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(actorder="group"),
                     "actorder"),
    }
    for i, (label, (tensors, config, says)) in enumerate(cases.items()):
        bad = _broken(good, folders["root"] / f"bad-{i}", tensors, config)
        with pytest.raises(HeaprError, match=says):
            validate_checkpoint(bad)
        code, _, err = run_cli("inspect", bad)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 3, (label, err)
