"""Property: every command refuses a bad value of any one option or path, before work starts.

Hypothesis draws one bad value for one option of `compress`, `apply`, `quantize`, `eval`, `inspect`, `serve`,
`bench` or `ab-proxy` (every other argument valid or harmless) and runs the real entry point in
this process. Each example must end with exit code 2, at most three lines of output naming the
option, no traceback, within a few seconds, and no new file anywhere in the workspace. Two guards
fail the test loudly instead of starting a server if a bad value were ever let through: `serve`
would exec vLLM and `ab-proxy` would listen forever.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLE_MODEL, run_cli

FAST = ["--nsamples", "4", "--seq-len", "32", "--batch-size", "2"]
SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=100,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_models):
    """A workspace of real inputs: a dense model, a pruned one, and the usual wrong things."""
    root = tmp_path_factory.mktemp("bad-input")
    model = tiny_models["qwen3_moe"]
    code, _, err = run_cli("compress", model, "-o", root / "pruned", *FAST)
    assert code == 0, err
    (root / "file.txt").write_text("just text\n")
    (root / "empty.txt").write_text(" \n")
    (root / "data.csv").write_text("a,b\n")
    (root / "folder").mkdir()
    (root / "existing").mkdir()
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    yield {"root": root, "model": model, "pruned": root / "pruned", "busy": busy.getsockname()[1],
           "dead": f"http://127.0.0.1:{dead}"}
    busy.close()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@contextlib.contextmanager
def _no_server_may_start():
    def refuse(*_a, **_k):
        raise AssertionError("a server was about to start: the bad value got through")

    with mock.patch.object(os, "execv", refuse), mock.patch("uvicorn.Server.run", refuse):
        yield


def _refused(ws, argv: list, names: str) -> None:
    root = ws["root"]
    before = _tree(root)
    cwd = os.getcwd()
    os.chdir(root)  # relative defaults (bench's runs/ab-bench) land in the workspace too
    start = time.perf_counter()
    try:
        with _no_server_may_start():
            code, out, err = run_cli(*argv)
    finally:
        os.chdir(cwd)
    elapsed = time.perf_counter() - start
    text = out + err
    lines = [line for line in text.strip().splitlines() if line.strip()]
    shown = f"argv={argv}\n{text}"
    assert code == 2, shown
    assert 1 <= len(lines) <= 3 and "Traceback" not in text, shown
    assert any(n in text for n in names.split("|")), f"the message names none of {names}: {shown}"
    assert elapsed < 10, f"took {elapsed:.1f} s: {shown}"
    after = _tree(root)
    assert after == before, f"new files {sorted(after - before)}: {shown}"


WORDS = st.text(alphabet="abcxyz-_", min_size=1, max_size=8).filter(lambda w: not w.startswith("-"))
NOT_INT = st.sampled_from(["abc", "1.5", "", "1e3", "0x10", "--"])
NOT_FLOAT = st.sampled_from(["abc", "", "1,5", "--", "one"])
BELOW_ONE = st.integers(-10**6, 0).map(str)
NEGATIVE = st.integers(-10**6, -1).map(str)
NAN_OR_NONPOSITIVE = st.sampled_from(["nan", "0", "-1", "-0.5", "inf"])


def _choice(*good: str):
    return WORDS.filter(lambda w: w not in good)


def _paths(ws, *kinds: str):
    """Bad paths of the given kinds, as strings under the workspace."""
    root = ws["root"]
    options = {
        "missing": st.builds(lambda w: str(root / f"missing-{w}"), WORDS),
        "missing-deep": st.builds(lambda w: str(root / "nope" / w / "x"), WORDS),
        "file": st.just(str(root / "file.txt")),
        "under-file": st.builds(lambda w: str(root / "file.txt" / w), WORDS),
        "folder": st.just(str(root / "folder")),
        "existing": st.just(str(root / "existing")),
        "llama": st.just(str(root / "llama")),
        "long": st.builds(lambda n: str(root / ("n" * n)), st.integers(256, 400)),
    }
    return st.one_of(*(options[k] for k in kinds))


# --- compress ---

def _compress_cases(ws):
    model, root = str(ws["model"]), ws["root"]
    base = [model, "-o", str(root / "new-out"), *FAST]
    paths = _paths(ws, "missing", "file", "folder", "llama")
    outs = st.one_of(_paths(ws, "existing", "under-file", "file", "long"), st.just(model),
                     st.just(str(Path(model) / "inside")))
    return st.one_of(
        st.tuples(st.just("MODEL|no such|no config|supported|is a file"), paths.map(lambda p: [p, "-o", str(root / "o"), *FAST])),
        st.tuples(st.just("-o"), outs.map(lambda o: [model, "-o", o, *FAST])),
        *(st.tuples(st.just(flag), values.map(lambda v, f=flag: [*base, f, v])) for flag, values in [
            ("--ratio", st.one_of(st.floats(1.0, 1e9).map(str), st.floats(-1e9, -1e-9).map(str), NOT_FLOAT)),
            ("--scope", _choice("global", "layer")),
            ("--align", st.one_of(BELOW_ONE, NOT_INT)),
            ("--calib", st.one_of(_paths(ws, "missing", "folder"), st.sampled_from([str(root / "empty.txt"), str(root / "data.csv")]))),
            ("--nsamples", st.one_of(BELOW_ONE, NOT_INT)),
            ("--seq-len", st.one_of(st.integers(-10**6, 1).map(str), st.integers(2049, 10**7).map(str), NOT_INT)),
            ("--batch-size", st.one_of(BELOW_ONE, NOT_INT)),
            ("--seed", st.one_of(NOT_INT, st.integers(2**63, 2**80).map(str))),
            ("--dtype", _choice("auto", "float32", "bfloat16", "float16")),
            ("--device", st.one_of(_choice("auto", "cpu", "cuda", "meta", "mps", "xpu"), st.just("cuda:3"))),
            ("--method", _choice("heapr", "fisher", "activation", "reap", "frequency", "random", "uniform", "magnitude", "expert")),
            ("--activations-dir", _paths(ws, "under-file", "file")),
            ("--checkpoint-every", st.one_of(BELOW_ONE, NOT_INT)),
            ("--reconstruct-inputs", _choice("pruned", "dense")),
            ("--reconstruct-damp", st.one_of(st.floats(-1e9, 0).map(str), NOT_FLOAT)),
            ("--heal-steps", st.one_of(BELOW_ONE, NOT_INT)),
            ("--heal-epochs", st.one_of(NAN_OR_NONPOSITIVE, NOT_FLOAT)),
            ("--heal-lr", st.one_of(st.floats(-1e9, 0).map(str), st.floats(1.0, 1e9).map(str), NOT_FLOAT)),
            ("--heal-batch-tokens", st.one_of(BELOW_ONE, NOT_INT)),
            ("--heal-holdout", st.one_of(st.floats(1.0, 1e9).map(str), st.floats(-1e9, 0).map(str), NOT_FLOAT)),
            ("--heal-target", _choice("layer", "stream")),
            ("--heal-e2e-lr", st.one_of(st.floats(-1e9, 0).map(str), st.floats(1.0, 1e9).map(str), NOT_FLOAT)),
            ("--quantize", _choice("w4a16", "w4a16-asym", "w8a16", "w8a8", "fp8", "fp8-block")),
            ("--quant-method", _choice("gptq", "rtn")),
            ("--quant-group-size", st.one_of(st.integers(-10**6, -2).map(str), st.sampled_from(["0", "12", "100"]), NOT_INT)),
        ]),
        st.tuples(st.just("--activations-dir"), st.just([*base, "--activations-dir", str(root / "act"), "--no-streamed"])),
        st.tuples(st.sampled_from(["--overwrite", "--keep-unrouted", "--eval", "--drop-mtp", "--streamed", "--reconstruct"]),
                  WORDS).map(lambda fv: (fv[0], [*base, f"{fv[0]}={fv[1]}"])),
        st.tuples(st.just("--bogus"), st.just([*base, "--bogus"])),
    )


@SETTINGS
@given(data=st.data())
def test_compress_refuses_every_bad_option(ws, data):
    names, rest = data.draw(_compress_cases(ws))
    _refused(ws, ["compress", *rest], names)


# --- apply ---

@SETTINGS
@given(data=st.data())
def test_apply_refuses_every_bad_option(ws, data):
    pruned, root = str(ws["pruned"]), ws["root"]
    base = [pruned, "-o", str(root / "new-out"), "--ratio", "0.5"]
    case = data.draw(st.one_of(
        st.tuples(st.just("SCORES|scores|no such|not a HEAPr"), _paths(ws, "missing", "file", "folder").map(lambda p: [p, "-o", str(root / "o"), "--ratio", "0.5"])),
        st.tuples(st.just("-o"), _paths(ws, "existing", "under-file", "file", "long").map(lambda o: [pruned, "-o", o, "--ratio", "0.5"])),
        st.tuples(st.just("--ratio"), st.one_of(st.floats(1.0, 1e9).map(str), NOT_FLOAT).map(lambda v: [pruned, "-o", str(root / "o"), "--ratio", v])),
        st.tuples(st.just("--ratio"), st.just([pruned, "-o", str(root / "o")])),  # required
        *(st.tuples(st.just(flag), values.map(lambda v, f=flag: [*base, f, v])) for flag, values in [
            ("--scope", _choice("global", "layer")),
            ("--align", st.one_of(BELOW_ONE, NOT_INT)),
            ("--model", _paths(ws, "missing", "file", "folder", "llama")),
            ("--method", _choice("heapr", "fisher", "activation", "reap", "frequency", "random", "uniform", "magnitude", "expert")),
            ("--seed", st.one_of(NOT_INT, st.integers(2**63, 2**80).map(str))),
            ("--reconstruct-inputs", _choice("pruned", "dense")),
            ("--reconstruct-damp", st.one_of(st.floats(-1e9, 0).map(str), NOT_FLOAT)),
            ("--device", st.one_of(_choice("auto", "cpu", "cuda", "meta", "mps", "xpu"), st.just("cuda:3"))),
            ("--heal-steps", st.one_of(BELOW_ONE, NOT_INT)),
            ("--heal-epochs", st.one_of(NAN_OR_NONPOSITIVE, NOT_FLOAT)),
            ("--heal-lr", st.one_of(st.floats(-1e9, 0).map(str), st.floats(1.0, 1e9).map(str), NOT_FLOAT)),
            ("--quantize", _choice("w4a16", "w4a16-asym", "w8a16", "w8a8", "fp8", "fp8-block")),
            ("--quant-method", _choice("gptq", "rtn")),
            ("--quant-group-size", st.one_of(st.integers(-10**6, -2).map(str), st.sampled_from(["0", "12", "100"]), NOT_INT)),
        ]),
    ))
    _refused(ws, ["apply", *case[1]], case[0] + ("|supported|" + case[1][-1] if case[0] == "--model" else ""))


# --- eval and inspect ---

@SETTINGS
@given(data=st.data())
def test_eval_and_inspect_refuse_every_bad_option(ws, data):
    pruned, root = str(ws["pruned"]), ws["root"]
    base = [pruned, "--seq-len", "32", "--max-tokens", "64"]
    case = data.draw(st.one_of(
        st.tuples(st.just("inspect"), st.just("CHECKPOINT|no config|supported|no such"), _paths(ws, "missing", "file", "folder", "llama").map(lambda p: [p])),
        st.tuples(st.just("eval"), st.just("CHECKPOINTS|no config|no such|is a file"), _paths(ws, "missing", "file", "folder").map(lambda p: [p])),
        st.tuples(st.just("eval"), st.just("nothing to evaluate"), st.just([])),
        st.tuples(st.just("eval"), st.just("--tasks"), WORDS.map(lambda t: [*base, "--tasks", t])),
        *(st.tuples(st.just("eval"), st.just(flag), values.map(lambda v, f=flag: [*base, f, v])) for flag, values in [
            ("--endpoint", st.one_of(st.sampled_from(["http://", "ftp://", "http://127.0.0.1:99999", "a b", "http://x:port"]), st.just(ws["dead"]))),
            ("--tokenizer", _paths(ws, "missing", "file")),
            ("--limit", st.one_of(BELOW_ONE, NOT_INT)),
            ("--num-fewshot", st.one_of(NEGATIVE, NOT_INT)),
            ("--text", _paths(ws, "missing", "folder")),
            ("--seq-len", st.one_of(st.integers(-10**6, 1).map(str), st.integers(2049, 10**7).map(str), NOT_INT)),
            ("--batch-size", st.one_of(BELOW_ONE, NOT_INT)),
            ("--max-tokens", st.one_of(st.integers(-10**6, 31).map(str), NOT_INT)),
            ("--dtype", _choice("float32", "bfloat16", "float16")),
            ("--device", st.one_of(_choice("auto", "cpu", "cuda", "meta", "mps", "xpu"), st.just("cuda:3"))),
            ("--json", _paths(ws, "folder", "under-file", "long")),
        ]),
    ))
    command, names, rest = case
    _refused(ws, [command, *rest], names)


# --- quantize ---

@SETTINGS
@given(data=st.data())
def test_quantize_refuses_every_bad_option(ws, data):
    model, root = str(ws["model"]), ws["root"]
    base = [model, "-o", str(root / "new-out")]
    outs = st.one_of(_paths(ws, "existing", "under-file", "file", "long"), st.just(model), st.just(str(Path(model) / "inside")))
    case = data.draw(st.one_of(
        st.tuples(st.just("FOLDER|not a folder|no config|supported|no such"), _paths(ws, "missing", "file", "folder", "llama").map(lambda p: [p, "-o", str(root / "o")])),
        st.tuples(st.just("-o"), outs.map(lambda o: [model, "-o", o])),
        st.tuples(st.just("--scheme"), _choice("w4a16", "w4a16-asym", "w8a16", "w8a8", "fp8", "fp8-block").map(lambda v: [*base, "--scheme", v])),
        st.tuples(st.just("--group-size"), st.one_of(NOT_INT, st.sampled_from(["0", "-2", "12", "33", "7"])).map(lambda v: [*base, "--group-size", v])),
        st.tuples(st.just("--group-size"), st.sampled_from(["fp8-block", "w8a8", "fp8"]).map(lambda sc: [*base, "--scheme", sc, "--group-size", "32"] if sc == "fp8-block" else [*base, "--scheme", sc, "--group-size", "12"])),
        st.tuples(st.just("--ignore"), st.sampled_from(["(", "[a-", "*x", "a{2,1}"]).map(lambda v: [*base, "--ignore", v])),
        st.tuples(st.sampled_from(["--overwrite", "--only-experts"]), WORDS).map(lambda fv: (fv[0], [*base, f"{fv[0]}={fv[1]}"])),
        st.tuples(st.just("--bogus"), st.just([*base, "--bogus"])),
    ))
    _refused(ws, ["quantize", *case[1]], case[0])


# --- serve, bench, ab-proxy: refused before any server starts ---

@SETTINGS
@given(data=st.data())
def test_serve_refuses_before_vllm_starts(ws, data):
    pruned = str(ws["pruned"])
    rest = data.draw(st.one_of(
        _paths(ws, "missing", "file").map(lambda p: [p]),
        st.sampled_from([["--quantization", "fp8"], ["-q", "fp8"],
                         ["--enable-eplb"], ["--enable-lora"], ["--model", pruned], [f"--model={pruned}"]]).map(lambda f: [pruned, *f]),
    ))
    _refused(ws, ["serve", *rest], "no such|not a folder|not supported|--model|drop|PATH")


@SETTINGS
@given(data=st.data())
def test_bench_refuses_every_bad_option(ws, data):
    dead, root = ws["dead"], ws["root"]
    base = ["--a", dead, "--b", dead, "--warmup", "0"]
    arm = st.one_of(_paths(ws, "missing", "file", "folder"), st.sampled_from(["ftp://x", "http://", "x"]))
    flag, value = data.draw(st.one_of(
        st.tuples(st.sampled_from(["--a", "--b"]), arm),
        *(st.tuples(st.just(flag), values) for flag, values in [
            ("--concurrency", st.one_of(st.sampled_from(["0", "a,b", "1.5", ",", "-4"]), BELOW_ONE)),
            ("--request-rate", st.one_of(st.sampled_from(["0", "x", "-1", "1,,-2"]), NEGATIVE)),
            ("--max-concurrency", st.one_of(BELOW_ONE, NOT_INT)),
            ("--num-prompts", st.one_of(BELOW_ONE, NOT_INT)),
            ("--input-len", st.one_of(BELOW_ONE, NOT_INT)),
            ("--output-len", st.one_of(BELOW_ONE, NOT_INT)),
            ("--prompts", st.one_of(_paths(ws, "missing", "folder"), st.sampled_from([str(root / "empty.txt"), str(root / "data.csv")]))),
            ("--endpoint", _choice("completions", "chat")),
            ("--schedule", _choice("alternate", "concurrent")),
            ("--blocks", st.one_of(BELOW_ONE, NOT_INT)),
            ("--warmup", st.one_of(NEGATIVE, NOT_INT)),
            ("--settle", st.one_of(NEGATIVE, st.just("nan"), st.just("inf"), NOT_FLOAT)),
            ("--timeout", st.one_of(NAN_OR_NONPOSITIVE, NOT_FLOAT)),
            ("--out", _paths(ws, "file", "under-file", "long")),
            ("--server-timeout", st.one_of(NAN_OR_NONPOSITIVE, NOT_FLOAT)),
            ("--kv-cache-gib", st.one_of(NAN_OR_NONPOSITIVE, NOT_FLOAT)),
            ("--metrics-port", st.one_of(st.integers(-10, 0).map(str), st.integers(65536, 10**6).map(str),
                                         st.just(str(ws["busy"])), NOT_INT)),
            ("--seed", NOT_INT),
        ]),
    ))
    args = list(base)
    if flag in ("--a", "--b"):
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    _refused(ws, ["bench", *args], flag)


@SETTINGS
@given(data=st.data())
def test_ab_proxy_refuses_before_listening(ws, data):
    dead = ws["dead"]
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = str(free.getsockname()[1])
    free.close()
    base = ["--a", dead, "--b", dead, "--port", port]
    flag, value = data.draw(st.one_of(
        *(st.tuples(st.just(flag), values) for flag, values in [
            ("--a", st.sampled_from(["x", "ftp://h", "http://h:99999", "http://", "http://a b"])),
            ("--b", st.sampled_from(["x", "ftp://h", "http://h:99999", "http://", "http://a b"])),
            ("--share-b", st.one_of(st.floats(1.0001, 1e9).map(str), st.floats(-1e9, -1e-9).map(str), st.just("nan"), NOT_FLOAT)),
            ("--host", st.sampled_from(["203.0.113.7", "192.0.2.1"])),
            ("--port", st.one_of(st.integers(-10, 0).map(str), st.integers(65536, 10**6).map(str), st.just(str(ws["busy"])), NOT_INT)),
            ("--connect-timeout", st.one_of(NAN_OR_NONPOSITIVE, NOT_FLOAT)),
            ("--timeout", st.one_of(NAN_OR_NONPOSITIVE, NOT_FLOAT)),
            ("--max-connections", st.one_of(BELOW_ONE, NOT_INT)),
            ("--max-inflight", st.one_of(BELOW_ONE, NOT_INT)),
            ("--max-body-mb", st.one_of(NAN_OR_NONPOSITIVE, NOT_FLOAT)),
            ("--health-interval", st.one_of(NAN_OR_NONPOSITIVE, NOT_FLOAT)),
            ("--shadow-rate", st.one_of(st.floats(1.0001, 1e9).map(str), st.floats(-1e9, -1e-9).map(str), NOT_FLOAT)),
            ("--shadow-max-inflight", st.one_of(BELOW_ONE, NOT_INT)),
            ("--shadow-max-tokens", st.one_of(BELOW_ONE, NOT_INT)),
            ("--ramp", st.sampled_from(["0", "50,25", "5,500", "x", "25,25", "-5,100"])),
        ]),
        # ramp flags that need --ramp, or do not fit with it
        st.sampled_from([("--share-b", ["--ramp", "5,100", "--share-b", "0.2"]), ("--step-after", ["--ramp", "5,100", "--step-after", "0"]),
                         ("--slo-latency-ratio", ["--ramp", "5,100", "--slo-latency-ratio", "-1"]),
                         ("--slo-agreement", ["--ramp", "5,100", "--slo-agreement", "0.9"]),
                         ("--ramp-state", ["--ramp-state", str(ws["root"] / "state.json")]),
                         ("--ramp-state", ["--ramp", "5,100", "--ramp-state", str(ws["root"])])]),
    ))
    args = list(base)
    if isinstance(value, list):
        _refused(ws, ["ab-proxy", *args, *value], flag)
        return
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    _refused(ws, ["ab-proxy", *args], flag)


def test_the_issue_cases(ws):
    """The three reports that started this: --seq-len past the model's positions, an output path that
    cannot be created, a refused bench's --out."""
    root = ws["root"]
    _refused(ws, ["compress", EXAMPLE_MODEL, "-o", root / "o", "--seq-len", "100000"], "2048 positions")
    _refused(ws, ["compress", ws["model"], "-o", root / "file.txt" / "o", *FAST], "is a file, not a folder")
    _refused(ws, ["bench", "--a", ws["dead"], "--b", ws["dead"], "--out", root / "bench-out"], "not reachable")
    assert not (root / "bench-out").exists()


def test_a_write_error_is_one_line_and_leaves_nothing(ws, tmp_path):
    """An OS error while the checkpoint is written (here: the folder it is staged in vanishes) is one
    line naming the output, and no output or staging folder remains."""
    from heapr_serve.preflight import staged_folder
    from heapr_serve.errors import HeaprError

    out = tmp_path / "nested" / "out"
    with pytest.raises(HeaprError, match=r"^-o .*out: could not write"):
        with staged_folder("-o", out) as folder:
            shutil.rmtree(folder)
            (folder / "x.json").write_text("{}")
    assert sorted(tmp_path.iterdir()) == []
