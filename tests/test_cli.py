"""The real `heapr-serve` entry point: happy paths, and every bad input ends in one line, exit 2,
and no output folder."""

import json

import pytest

from conftest import run_cli

FAST = ["--nsamples", "4", "--seq-len", "32", "--batch-size", "2"]


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_compress_apply_inspect_eval(tmp_path, tiny_models, capsys):
    src = tiny_models["qwen3_moe"]
    out = tmp_path / "p25"
    code, stdout, err = run_cli("compress", src, "-o", out, "--ratio", "0.25", "--align", "8", *FAST, capsys=capsys)
    assert code == 0, err
    assert "effective ratio" in err + stdout and "parameters after" in err + stdout
    heapr = json.loads((out / "config.json").read_text())["heapr"]
    assert abs(heapr["effective_ratio"] - 0.25) < 8 / (2 * 8 * 64)
    assert heapr["calibration"]["nsamples"] == 4 and len(heapr["calibration"]["sha256"]) == 64

    # re-prune from the saved scores: no calibration, same scores, another ratio
    out2 = tmp_path / "p50"
    code, stdout, err = run_cli("apply", out, "-o", out2, "--ratio", "0.5", capsys=capsys)
    assert code == 0, err
    heapr2 = json.loads((out2 / "config.json").read_text())["heapr"]
    assert heapr2["calibration"] == heapr["calibration"] and heapr2["effective_ratio"] == pytest.approx(0.5)
    assert (out2 / "heapr_scores.safetensors").read_bytes() == (out / "heapr_scores.safetensors").read_bytes()

    code, stdout, err = run_cli("inspect", out2, capsys=capsys)
    assert code == 0 and "kept share" in stdout + err and "before ->" in stdout + err

    code, stdout, err = run_cli("eval", src, out, out2, "--seq-len", "64", "--max-tokens", "1024", capsys=capsys)
    assert code == 0, err
    table = stdout + err
    assert "perplexity" in table and "p50" in table and table.count("%") >= 3


@pytest.mark.parametrize(
    "make_args, needles",
    [
        (lambda t, m: ["compress", t / "nope", "-o", t / "o"], ["nope", "no such folder"]),
        (lambda t, m: ["compress", m, "-o", t / "o", "--ratio", "1.5"], ["--ratio"]),
        (lambda t, m: ["compress", m, "-o", t / "o", "--scope", "expert"], ["--scope"]),
        (lambda t, m: ["compress", m, "-o", t / "o", "--dtype", "int8"], ["--dtype"]),
        (lambda t, m: ["compress", m, "-o", t / "o", "--calib", t / "empty.txt"], ["empty.txt", "empty"]),
        (lambda t, m: ["compress", m, "-o", t / "o", "--calib", t / "short.txt"], ["short.txt", "--seq-len"]),
        (lambda t, m: ["compress", m, "-o", t / "o", "--calib", t / "ids.jsonl"], ["ids.jsonl", "outside the vocabulary"]),
        (lambda t, m: ["compress", m, "-o", t / "o", "--calib", t / "bad.jsonl"], ["bad.jsonl:2", "JSON"]),
        (lambda t, m: ["compress", m, "-o", t / "o", "--calib", t / "data.csv"], ["data.csv", ".jsonl"]),
        (lambda t, m: ["compress", m, "-o", t / "exists"], ["exists", "--overwrite"]),
        (lambda t, m: ["compress", m, "-o", m / "inside"], ["outside the input"]),
        (lambda t, m: ["compress", t / "unsupported", "-o", t / "o"], ["llama", "supported MoE families"]),
        (lambda t, m: ["apply", t / "empty.txt", "-o", t / "o", "--ratio", "0.3"], ["not a HEAPr scores file"]),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny_models, capsys, make_args, needles):
    model = tiny_models["olmoe"]
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "ids.jsonl").write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [5, 999999]}\n' * 2)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "exists").mkdir()
    (tmp_path / "unsupported").mkdir()
    (tmp_path / "unsupported" / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    before = sorted(p.name for p in tmp_path.iterdir())
    model_files = sorted(p.name for p in model.iterdir())
    args = make_args(tmp_path, model)
    code, _, err = run_cli(*args, *(FAST if args[0] == "compress" else []), capsys=capsys)
    _one_line_error(code, err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging folder
    assert sorted(p.name for p in model.iterdir()) == model_files


def test_compress_refuses_an_already_pruned_model(tmp_path, tiny_models, capsys):
    out = tmp_path / "p"
    assert run_cli("compress", tiny_models["mixtral"], "-o", out, *FAST, capsys=capsys)[0] == 0
    code, _, err = run_cli("compress", out, "-o", tmp_path / "again", *FAST, capsys=capsys)
    _one_line_error(code, err, "already a pruned checkpoint")
    assert not (tmp_path / "again").exists()


def test_overwrite_replaces_an_existing_output(tmp_path, tiny_models, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run_cli("compress", tiny_models["qwen2_moe"], "-o", out, "--overwrite", *FAST, capsys=capsys)
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


def test_corrupt_weights_are_one_line(tmp_path, tiny_models, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["qwen3_moe"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = run_cli("compress", broken, "-o", tmp_path / "o", *FAST, capsys=capsys)
    _one_line_error(code, err, "model.safetensors", "not a readable safetensors file")
    assert not (tmp_path / "o").exists()


def test_apply_refuses_scores_from_other_weights(tmp_path, tiny_models, capsys):
    import shutil

    from tools.build_tiny_models import build_tiny_model

    source = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3_moe"], source)
    assert run_cli("compress", source, "-o", tmp_path / "p", *FAST, capsys=capsys)[0] == 0
    build_tiny_model("qwen3_moe", source, seed=99)  # "retrained": same shapes, other weights
    code, _, err = run_cli("apply", tmp_path / "p", "-o", tmp_path / "p2", "--ratio", "0.5", capsys=capsys)
    _one_line_error(code, err, "other weights", "compress")
    assert not (tmp_path / "p2").exists()


def test_expert_level_method_says_which_flags_it_ignores(tmp_path, tiny_models, capsys):
    code, out, err = run_cli("compress", tiny_models["qwen3_moe"], "-o", tmp_path / "p", "--method", "reap",
                             "--align", "16", "--scope", "layer", *FAST, capsys=capsys)
    assert code == 0, err
    assert "--method reap ignores --scope and --align" in " ".join((out + err).split())
