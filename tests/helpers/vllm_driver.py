"""Run the real vLLM CPU engine on several models, one after another, in ONE process (a subprocess of
the test): start-up is the expensive part, and only one engine may run at a time on the test machine.

Usage: python -m tests.helpers.vllm_driver JOB.json OUT.json
JOB: {"runs": [{"model": PATH, "dtype": "bfloat16", "prompts": [[ids...], ...], "max_tokens": 8}],
      "expect_error": false}
OUT: {"runs": [{"model", "tokens": [[...]], "logprobs": [[{id: lp}, ...]], "weight_bytes": int,
      "load_log": str}]}, or {"error": str} when the engine refused the model.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

_LOADED: dict[str, int] = {}


def _record_loaded_weights() -> None:
    """Record the weight bytes vLLM allocated and filled (unique storages) at the end of loading,
    just before `process_weights_after_loading`: the quantity vLLM's GPU backend reports as "Model
    loading took X GiB". Its CPU backend logs no such figure, and after post-processing the CPU dense
    linears live in oneDNN handles that parameters no longer show."""
    from vllm.model_executor.model_loader import base_loader

    original = base_loader.process_weights_after_loading
    if getattr(original, "_heapr_recording", False):
        return

    def recording(model, model_config, target_device):
        seen = {}
        for p in model.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
        _LOADED["bytes"] = sum(seen.values())
        return original(model, model_config, target_device)

    recording._heapr_recording = True
    base_loader.process_weights_after_loading = recording


def _uses_mla(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return bool(json.load(f).get("kv_lora_rank"))
    except (OSError, ValueError):
        return False


def run_one(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    _record_loaded_weights()
    _LOADED.clear()
    start = time.time()
    extra = {}
    if spec.get("dtype") == "float32" and _uses_mla(spec["model"]):
        # vLLM-CPU picks its AMX MLA backend on AMX machines, whose weight prepack takes 16-bit
        # weights only; float32 MLA runs on the reference CPU_MLA backend there (as elsewhere)
        extra["attention_backend"] = "CPU_MLA"
    llm = LLM(
        spec["model"],
        **extra,
        dtype=spec.get("dtype", "bfloat16"),
        enforce_eager=True,
        max_model_len=spec.get("max_model_len", 256),
        max_num_seqs=spec.get("max_num_seqs", 16),
        seed=0,
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
        enable_expert_parallel=spec.get("enable_expert_parallel", False),
        # one worker in this process (errors surface as raised); tensor parallelism needs processes
        distributed_executor_backend="uni" if spec.get("tensor_parallel_size", 1) == 1 else "mp",
    )
    load_s = time.time() - start
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0, logprobs=5, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    result = {
        "model": spec["model"],
        "load_s": load_s,
        "loaded_weight_bytes": _LOADED.get("bytes"),
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [
            [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs
        ],
    }
    # the weight memory vLLM itself accounts for the model it built
    model = _driver_model(llm)
    if model is not None:
        result["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        result["buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers())
        # the routed-expert stacks of heapr-serve's pruned layers (their own parameters only)
        result["expert_bytes"] = sum(p.numel() * p.element_size() for m in model.modules()
                                     if type(m).__name__ == "HeaprRoutedExperts" for p in m.parameters(recurse=False))
    del llm
    gc.collect()
    result["run_s"] = time.time() - start  # start-up, generation and teardown: what a run costs the suite
    return result


def _driver_model(llm):
    """The nn.Module inside the (multiprocess or in-process) engine, when reachable; else None."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    except Exception:
        pass
    try:
        sizes = llm.collective_rpc(_model_weight_bytes)
        return _Sized(sizes[0])
    except Exception:
        return None


def _model_weight_bytes(self):
    model = self.model_runner.model
    return (
        sum(p.numel() * p.element_size() for p in model.parameters()),
        sum(b.numel() * b.element_size() for b in model.buffers()),
    )


class _Sized:
    """Stands in for a module when only its byte counts came back over RPC."""

    def __init__(self, sizes):
        self.sizes = sizes

    def parameters(self):
        return [_Bytes(self.sizes[0])]

    def buffers(self):
        return [_Bytes(self.sizes[1])]

    def modules(self):  # the workers' modules stay in their processes: no per-layer expert bytes
        return []


class _Bytes:
    def __init__(self, n):
        self.n = n

    def numel(self):
        return self.n

    def element_size(self):
        return 1


def run_engines(runs: list[dict], root, timeout: float, extra_env: dict | None = None) -> list[dict]:
    """Run the engine specs `runs` one after another in ONE fresh subprocess of this driver (the CPU
    engine's start-up and memory are paid once); returns their results in order. `extra_env`: e.g.
    PYTHONPATH with zentorch, for the runs that need it."""
    import subprocess
    from pathlib import Path

    root = Path(root)
    job, out = root / "job.json", root / "out.json"
    job.write_text(json.dumps({"runs": runs}))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", **(extra_env or {}))
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.vllm_driver", str(job), str(out)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return json.loads(out.read_text())["runs"], proc.stdout + proc.stderr


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    job = json.loads(open(sys.argv[1]).read())
    results = []
    for spec in job["runs"]:
        start = time.time()
        try:
            results.append(run_one(spec))
        except Exception as err:  # the test inspects the message
            results.append({"model": spec["model"], "error": f"{type(err).__name__}: {err}", "run_s": time.time() - start})
    with open(sys.argv[2], "w") as f:
        json.dump({"runs": results}, f)


if __name__ == "__main__":
    main()
