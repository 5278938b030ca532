"""`heapr-serve serve`: bad folders fail fast with one line; a pruned folder serves the OpenAI API.

The server test starts the real command (which execs vLLM's OpenAI-compatible server with the plugin)
on a pruned random Qwen3-MoE (the dense folder served through `serve` is tests/test_vllm_endpoints.py's
server). The refusals run the real console entry point in-process (with `os.execv` made to fail, so
a refusal that let vLLM start fails the test instead of replacing it), and one of them also as its
own process, to show exactly what a user's shell sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heapr_serve.ab.local_vllm import LocalVllmServer
from tests.conftest import ROOT, run_cli
from tests.helpers.openai_api import check_openai_api
from tests.helpers.ragged import make_ragged, mixed_widths

pytest.importorskip("vllm")


def _serve(args, **kw) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    return subprocess.Popen([sys.executable, "-m", "heapr_serve.cli", "serve", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer):
    from tools.build_tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("serve-cli")
    dense = build_tiny_model("qwen3_moe", root / "dense", seed=3, tok=tiny_tokenizer)
    pruned = make_ragged(dense, root / "pruned", mixed_widths, seed=3)

    def variant(name, edit_config=None, edit_dir=None):
        folder = make_ragged(dense, root / name, mixed_widths, seed=3)
        if edit_config:
            config = json.loads((folder / "config.json").read_text())
            edit_config(config)
            (folder / "config.json").write_text(json.dumps(config))
        return folder

    def mismatch(config):
        widths = config["heapr"]["expert_widths"]["0"]
        widths[widths.index(64)] = 32

    return {
        "dense": dense,
        "pruned": pruned,
        "missing_widths": variant("missing-widths", lambda c: c["heapr"].pop("expert_widths")),
        "no_heapr_section": variant("no-heapr", lambda c: c.pop("heapr")),
        "mismatch": variant("mismatch", mismatch),
        "unsupported_family": variant("llama", lambda c: c.update(model_type="llama", architectures=["HeaprLlamaForCausalLM"])),
    }


BAD_CASES = {
    "missing_widths": "expert_widths is missing",
    "no_heapr_section": "no `heapr` section",
    "mismatch": "heapr.expert_widths declares width 32",
    "unsupported_family": "'llama' is not supported",
    "nonexistent": "no such folder",
    "unsupported_flag": "pruned checkpoints are quantized offline",
    "eplb": "EPLB (--enable-eplb) is not supported for pruned checkpoints: it moves experts",
    "ep_with_data_parallel": "--enable-expert-parallel with --data-parallel-size 2 is not supported",
}


SUBPROCESS_CASE = "mismatch"


def _no_exec(*args):
    raise AssertionError(f"serve exec'd vLLM instead of refusing: {args}")


@pytest.fixture(scope="module")
def refusals(folders, tmp_path_factory):
    """Run `serve` on every bad input, one after another, timing each."""
    missing = tmp_path_factory.mktemp("missing") / "does-not-exist"
    argv = {case: [folders.get(case, missing), "--port", "1"] for case in BAD_CASES}
    argv["unsupported_flag"] = [folders["pruned"], "--quantization", "fp8"]
    argv["eplb"] = [folders["pruned"], "--enable-expert-parallel", "--enable-eplb"]
    argv["ep_with_data_parallel"] = [folders["pruned"], "-ep", "--data-parallel-size=2"]
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "execv", _no_exec)
        for case, args in argv.items():
            start = time.monotonic()
            code, out, err = run_cli("serve", *args)
            results[case] = (code, out, err, time.monotonic() - start)
    start = time.monotonic()
    proc = _serve(argv[SUBPROCESS_CASE])
    out, err = proc.communicate(timeout=300)
    results["process"] = (proc.returncode, out, err, time.monotonic() - start)
    return results


@pytest.mark.parametrize("case", [*BAD_CASES, "process"])
def test_bad_input_fails_fast_with_one_line(refusals, case):
    code, out, err, elapsed = refusals[case]
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert BAD_CASES[SUBPROCESS_CASE if case == "process" else case] in lines[0], lines[0]
    assert "Traceback" not in err and "vllm.entrypoints" not in err + out  # vLLM never started
    print(f"{case}: refused in {elapsed:.1f}s: {lines[0]}")


def test_serve_openai_endpoints(folders, tmp_path):
    which = "pruned"
    folder = folders[which]
    # vLLM's default CPU mode (torch.compile of the model, fullgraph): the ragged dispatch must survive it.
    # The engine runs beside the API server, not in two more processes (~20 s of imports each on 2 cores)
    server = LocalVllmServer(folder, served_name=which, through_serve=True, log=tmp_path / "server.log",
                             env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, startup_timeout=420,
                             extra=["--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "4",
                                    "--distributed-executor-backend", "uni"])
    with server:
        check_openai_api(server.url, which, folder)
    err = (tmp_path / "server.log").read_text()
    assert "heapr-serve: serving" in err and "pruned qwen3_moe" in err
    assert "heapr-serve: routed experts (silu): backend cpu (the CPU engine" in err  # which kernel, and why
