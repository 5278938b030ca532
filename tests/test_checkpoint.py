"""Pruned checkpoints: format, loading in transformers, exact function, and refusal of bad folders."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from heapr_serve.calibrate.datasets import CalibrationSet
from heapr_serve.prune.options import PruneOptions
from heapr_serve.prune.to_folder import prune_to_folder
from heapr_serve.errors import HeaprError
from heapr_serve.families import family_for, moe_blocks
from model_patches.transformers.loader import RaggedExperts
from heapr_serve.checkpoint.validate import validate_checkpoint
from heapr_serve.score.calibration_pass import collect_statistics
from heapr_serve.score.observers import HeaprObserver

from conftest import FAMILIES
from tests.helpers.ragged import zero_pruned_neurons


def _stats(folder, unrouted_expert=None):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet([torch.randint(0, 4096, (40,), generator=g) for _ in range(6)], "random", 40)
    stats = collect_statistics(model, calib.batches(3, 0), 120.0, observer=HeaprObserver())
    if unrouted_expert is not None:
        layer = min(stats.tokens)
        stats.tokens[layer][unrouted_expert] = 0  # as if never routed: no score, removed first
    stats.metadata = {"source_model": str(folder), "model_type": model.config.model_type}
    return stats


def _zeroed_dense(folder, plan):
    """The dense model with every pruned neuron zeroed: the function the pruned model must compute."""
    return zero_pruned_neurons(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), plan).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_checkpoint_loads_and_computes_the_pruned_function(tmp_path, tiny_models, family):
    source = tiny_models[family]
    before = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    out = tmp_path / "pruned"
    result = prune_to_folder(source, out, _stats(source, unrouted_expert=3), PruneOptions(0.4))

    # the source is untouched, the output is complete and self-describing
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == before
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [family_for(config).pruned_architecture]
    heapr = config["heapr"]
    assert heapr["effective_ratio"] == pytest.approx(0.4, abs=1e-3)
    first = min(int(k) for k in heapr["expert_widths"])
    assert heapr["expert_widths"][str(first)][3] == 0
    assert {"tokenizer.json", "README.md", "heapr_scores.safetensors", "generation_config.json", "model.safetensors.index.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    ckpt = validate_checkpoint(out)
    assert ckpt.widths == {int(k): v for k, v in heapr["expert_widths"].items()}
    assert result.pruned_params < result.source_params

    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(isinstance(b.experts, RaggedExperts) for b in moe_blocks(pruned).values())
    # nothing more, nothing less (but the tensors outside the causal LM: Qwen3.5's vision tower, kept in the folder)
    family = family_for(config)
    with safe_open(out / "model.safetensors", "pt") as f:
        unserved = sum(torch.Size(f.get_slice(n).get_shape()).numel() for n in f.keys() if family.is_unserved(n))
    assert (unserved > 0) == (family.model_type == "qwen3_5_moe")  # the only tiny model with a vision tower
    assert sum(t.numel() for t in pruned.state_dict().values()) == result.pruned_params - unserved
    reference = _zeroed_dense(source, result.plan)
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = pruned(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


@pytest.fixture(scope="module")
def pruned_qwen2(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("pq2") / "pruned"
    prune_to_folder(tiny_models["qwen2_moe"], out, _stats(tiny_models["qwen2_moe"]), PruneOptions(0.5, align=16))
    return out


def _tamper(tmp_path, pruned, edit):
    bad = tmp_path / "bad"
    shutil.copytree(pruned, bad)
    edit(bad)
    return bad


def _resave(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_shape_mismatch_is_refused_by_every_loader(tmp_path, pruned_qwen2):
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"

    def widen(t):
        t[name] = torch.zeros(t[name].shape[0] + 1, t[name].shape[1])

    bad = _tamper(tmp_path, pruned_qwen2, lambda f: _resave(f, widen))
    with pytest.raises(HeaprError, match=r"tensor model\.layers\.1\.mlp\.experts\.2\.gate_proj\.weight has shape"):
        validate_checkpoint(bad)
    with pytest.raises(HeaprError, match="has shape"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_missing_tensor_and_bad_widths_are_refused(tmp_path, pruned_qwen2):
    widths = json.loads((pruned_qwen2 / "config.json").read_text())["heapr"]["expert_widths"]
    expert = next(e for e, w in enumerate(widths["0"]) if w > 0)
    name = f"model.layers.0.mlp.experts.{expert}.down_proj.weight"
    bad = _tamper(tmp_path, pruned_qwen2, lambda f: _resave(f, lambda t: t.pop(name)))
    with pytest.raises(HeaprError, match="is missing"):
        validate_checkpoint(bad)

    def drop_widths(folder):
        config = json.loads((folder / "config.json").read_text())
        del config["heapr"]["expert_widths"]
        (folder / "config.json").write_text(json.dumps(config))

    bad2 = _tamper(tmp_path / "b", pruned_qwen2, drop_widths)
    with pytest.raises(HeaprError, match="expert_widths is missing"):
        AutoModelForCausalLM.from_pretrained(bad2)


def test_shared_expert_and_its_gate_are_kept_whole(pruned_qwen2, tiny_models):
    with safe_open(pruned_qwen2 / "model.safetensors", "pt") as f, safe_open(tiny_models["qwen2_moe"] / "model.safetensors", "pt") as d:
        for name in d.keys():
            if "shared_expert" in name or ".mlp.gate." in name:
                assert torch.equal(f.get_tensor(name), d.get_tensor(name))
    widths = validate_checkpoint(pruned_qwen2).widths
    assert all(w % 16 == 0 for ws in widths.values() for w in ws)


@pytest.mark.parametrize("order", ["heapr_serve first", "transformers first"])
def test_patch_works_whichever_is_imported_first(pruned_qwen2, order):
    import subprocess
    import sys

    imports = ["import heapr_serve", "from transformers import AutoModelForCausalLM"]
    if order == "transformers first":
        imports.reverse()
    code = "; ".join(imports + [
        f"m = AutoModelForCausalLM.from_pretrained({str(pruned_qwen2)!r})",
        "print(type(m.model.layers[0].mlp.experts).__name__)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["RaggedExperts"]


def test_importing_heapr_serve_stays_cheap():
    """The patch waits for transformers' auto models, so `import heapr_serve` (and every CLI refusal)
    does not pay for importing them."""
    import subprocess
    import sys

    code = "import sys, heapr_serve; print('transformers.models.auto.modeling_auto' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    # nor does the command line pay for compressed-tensors (~8 s on 2 cores) unless it quantizes
    code = "import sys, heapr_serve.cli; print(sorted(m for m in ('compressed_tensors', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_mtp_module_of_qwen3_next_is_kept_whole(tmp_path, tiny_models):
    """Qwen3-Next and Qwen3.5 ship a separate MTP module (`mtp.layers.0.mlp.experts.*`, its own layer
    0): it is no routed expert of the model's layer 0, so it is written whole, not pruned with layer
    0's plan, and the pruned folder still loads and computes the pruned function."""
    source = tmp_path / "with-mtp"
    shutil.copytree(tiny_models["qwen3_next"], source)
    tensors = load_file(source / "model.safetensors")
    last = "model.layers.2."
    mtp = {"mtp." + n.removeprefix("model.").replace("layers.2.", "layers.0."): t.clone() for n, t in tensors.items() if n.startswith(last)}
    mtp["mtp.fc.weight"] = torch.randn(128, 256)
    save_file({**tensors, **mtp}, source / "model.safetensors")
    result = prune_to_folder(source, tmp_path / "pruned", _stats(source), PruneOptions(0.4))
    assert result.plan.widths[0] != [64] * 8  # layer 0 is pruned ...
    with safe_open(tmp_path / "pruned" / "model.safetensors", "pt") as f:
        for name, t in mtp.items():  # ... and the MTP module's experts are not
            assert torch.equal(f.get_tensor(name), t), name
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = pruned(input_ids=ids).logits, _zeroed_dense(source, result.plan)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()

    # --drop-mtp leaves the module out (and says so in the config); the model is the same
    config = json.loads((source / "config.json").read_text())
    config["mtp_num_hidden_layers"] = 1
    (source / "config.json").write_text(json.dumps(config))
    prune_to_folder(source, tmp_path / "dropped", _stats(source), PruneOptions(0.4, drop_mtp=True))
    with safe_open(tmp_path / "dropped" / "model.safetensors", "pt") as f:
        assert not [n for n in f.keys() if n.startswith("mtp.")]
    written = json.loads((tmp_path / "dropped" / "config.json").read_text())
    assert written["mtp_num_hidden_layers"] == 0 and "mtp." in written["heapr"]["dropped_modules"]
    validate_checkpoint(tmp_path / "dropped")


def test_shard_writer_writes_what_safetensors_would_byte_for_byte(tmp_path):
    """The checkpoint writer streams one tensor at a time (it never holds a shard, issue 29), and its
    shards are byte for byte what `safetensors.save_file` writes for the same tensors: same header,
    same layout (widest dtype first, then by name), whatever order the tensors came in."""
    import torch
    from safetensors.torch import save_file

    from heapr_serve.checkpoint.writer import _ShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"z.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16), "a.bias": torch.randn(5, generator=g),
               "m.scale": torch.randn(3, generator=g).double(), "b.ids": torch.arange(4, dtype=torch.int32),
               "c.mask": torch.tensor([True, False]), "d.fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
               "e.empty": torch.zeros(0, 3), "f.half": torch.randn(2, 2, generator=g).half()}
    writer = _ShardWriter(tmp_path, max_bytes=1 << 30)
    for name in reversed(list(tensors)):
        writer.add(name, tensors[name])
    writer.finish()
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    small = tmp_path / "small"
    small.mkdir()
    writer = _ShardWriter(small, max_bytes=100)  # several shards: each one what save_file makes of its tensors
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish()
    index = json.loads((small / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and set(index) == set(tensors)
    for shard in set(index.values()):
        mine = {n: tensors[n] for n, s in index.items() if s == shard}
        save_file(mine, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
        assert (small / shard).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), shard
