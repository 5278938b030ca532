"""End-to-end decode speed through `heapr-serve serve`: pruned vs dense, same server flags.

Writes a random Qwen3-MoE whose decode time is mostly MoE (Qwen3-30B-A3B's MoE layer shapes: hidden
2048, 128 experts of 768, top-8; small attention, few layers, 4k vocabulary), and a pruned copy whose
per-expert widths follow a HEAPr-like uneven pattern (some experts keep most neurons, a few drop to
0; multiples of --align; the shared pattern of tools/bench_moe_layer.pruned_widths). Then, for each
folder in turn (one server at a time), starts `heapr-serve serve` with the same flags, streams greedy
completions with a fixed number of output tokens, and reports decode tokens/s = (tokens - 1) /
(time of last token - time of first token), median over repeats, and the pruned/dense ratio; also
tokens per CPU-second of vLLM's worker process (the model forward's own work, which other jobs on a
shared machine do not inflate). `--alternations N` runs dense/pruned servers N times in turn.

  python -m tools.bench_serve_decode --work /tmp/decode-bench --json decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.moe_layer import pruned_widths  # noqa: E402
from heapr_serve.errors import HeaprError  # noqa: E402
from heapr_serve.ab.local_vllm import LocalVllmServer  # noqa: E402


def write_models(work: Path, args) -> tuple[Path, Path]:
    """Dense and pruned folders with the same random weights (pruned = kept neurons of the dense)."""
    from tools.build_tiny_models import VOCAB, tokenizer

    H, E, I, L = args.hidden, args.experts, args.width, args.layers
    heads, kv, hd = args.heads, args.kv_heads, args.head_dim
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": VOCAB,
        "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": hd, "num_experts": E, "num_experts_per_tok": args.top_k, "moe_intermediate_size": I,
        "intermediate_size": 4 * H, "decoder_sparse_step": 1, "norm_topk_prob": True, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
        "eos_token_id": 0, "pad_token_id": 0, "dtype": "bfloat16", "attention_bias": False,
    }
    dense, pruned = work / "dense", work / "pruned"
    for d in (dense, pruned):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    gen = torch.Generator().manual_seed(args.seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    widths = {l: pruned_widths(E, I, args.ratio, args.align, args.seed + l) for l in range(L)}
    index_d, index_p = {}, {}
    common = {
        "model.embed_tokens.weight": rnd(VOCAB, H, scale=1.0),
        "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
        "lm_head.weight": rnd(VOCAB, H, scale=H**-0.5),
    }
    save_file(common, dense / "common.safetensors", metadata={"format": "pt"})
    shutil.copy(dense / "common.safetensors", pruned / "common.safetensors")
    for name in common:
        index_d[name] = index_p[name] = "common.safetensors"
    for l in range(L):
        p = f"model.layers.{l}."
        layer = {
            p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(heads * hd, H, scale=H**-0.5),
            p + "self_attn.k_proj.weight": rnd(kv * hd, H, scale=H**-0.5),
            p + "self_attn.v_proj.weight": rnd(kv * hd, H, scale=H**-0.5),
            p + "self_attn.o_proj.weight": rnd(H, heads * hd, scale=(heads * hd) ** -0.5),
            p + "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            p + "mlp.gate.weight": rnd(E, H, scale=0.05),
        }
        dense_experts, pruned_experts = {}, {}
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            gate, up, down = rnd(I, H, scale=H**-0.5), rnd(I, H, scale=H**-0.5), rnd(H, I, scale=I**-0.5)
            dense_experts.update({q + "gate_proj.weight": gate, q + "up_proj.weight": up, q + "down_proj.weight": down})
            w = widths[l][e]
            if w:
                keep = torch.randperm(I, generator=gen)[:w].sort().values
                pruned_experts.update({q + "gate_proj.weight": gate[keep].clone(), q + "up_proj.weight": up[keep].clone(),
                                       q + "down_proj.weight": down[:, keep].contiguous()})
        file = f"layer-{l:03d}.safetensors"
        save_file({**layer, **dense_experts}, dense / file, metadata={"format": "pt"})
        save_file({**layer, **pruned_experts}, pruned / file, metadata={"format": "pt"})
        index_d.update({n: file for n in {**layer, **dense_experts}})
        index_p.update({n: file for n in {**layer, **pruned_experts}})
    kept = sum(sum(w) for w in widths.values())
    ratio = 1 - kept / (L * E * I)
    pruned_config = dict(config, architectures=["HeaprQwen3MoeForCausalLM"], heapr={
        "format_version": 1, "method": "heapr", "source_architectures": ["Qwen3MoeForCausalLM"],
        "source_model": str(dense), "dense_width": I, "expert_widths": {str(l): w for l, w in widths.items()},
        "ratio": args.ratio, "effective_ratio": round(ratio, 6), "align": args.align, "scope": "synthetic",
        "calibration": None,
    })
    tok = tokenizer()
    for folder, cfg, index in ((dense, config, index_d), (pruned, pruned_config, index_p)):
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        tok.save_pretrained(folder)
    return dense, pruned


def _worker_pids(session: int) -> list[int]:
    """The vLLM worker process(es) of the server session: they run the model forward."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == session and "Worker" in comm:  # fields[3]: session id
            pids.append(int(stat.parent.name))
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all threads): their own work, whatever else runs."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def measure(folder: Path, args, label: str) -> dict:
    import httpx

    env = {} if "VLLM_CPU_KVCACHE_SPACE" in os.environ else {"VLLM_CPU_KVCACHE_SPACE": "2"}
    server = LocalVllmServer(folder, served_name=label, extra=args.server_args.split(), through_serve=True,
                             log=Path(args.work) / f"server-{label}.log", env=env, startup_timeout=900)
    try:
        server.start()
        server.wait_ready()
        base = server.url
        workers = _worker_pids(server.proc.pid) or [server.proc.pid]  # uni executor: the model runs in the engine process

        def one(prompt: str) -> tuple[float, float]:
            body = {"model": label, "prompt": prompt, "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True, "stream": True}
            stamps, cpu = [], None
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        if json.loads(line[6:])["choices"][0].get("text") is not None:
                            stamps.append(time.perf_counter())
                            if cpu is None:
                                cpu = _cpu_seconds(workers)
            cpu = _cpu_seconds(workers) - cpu
            n = len(stamps) - 1
            return n / (stamps[-1] - stamps[0]), (n / cpu if cpu > 0 else float("nan"))  # tiny models: < 1 clock tick

        one("warm up the server")
        samples = [one(f"Request {i}: the mixture of experts") for i in range(args.repeats)]
        return {"tokens_per_s": statistics.median(s[0] for s in samples), "wall_samples": [s[0] for s in samples],
                "tokens_per_worker_cpu_s": statistics.median(s[1] for s in samples), "cpu_samples": [s[1] for s in samples]}
    except HeaprError as err:
        raise SystemExit(f"{label}: {err}") from None
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/heapr-decode-bench"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--align", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", default="--dtype bfloat16 --max-model-len 512 --max-num-seqs 4 --enforce-eager",
                        help="vLLM flags given to both servers")
    parser.add_argument("--reuse", action="store_true", help="reuse the folders already in --work")
    parser.add_argument("--alternations", type=int, default=1, help="dense/pruned server pairs, alternated")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dense, pruned = args.work / "dense", args.work / "pruned"
    if not (args.reuse and (pruned / "config.json").is_file()):
        dense, pruned = write_models(args.work, args)
    effective = json.loads((pruned / "config.json").read_text())["heapr"]["effective_ratio"]
    results = {"settings": vars(args) | {"work": str(args.work), "json": str(args.json)}, "effective_ratio": effective}
    order = [("dense", dense), ("pruned", pruned)] * args.alternations  # A B A B: load drifts alike
    runs: dict[str, list[dict]] = {"dense": [], "pruned": []}
    for label, folder in order:
        r = measure(folder, args, label)
        runs[label].append(r)
        print(f"{label}: {r['tokens_per_s']:.2f} decode tokens/s wall, {r['tokens_per_worker_cpu_s']:.2f} per worker CPU-second", flush=True)
    for label in runs:
        results[label] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[label]),
            "tokens_per_worker_cpu_s": statistics.median(r["tokens_per_worker_cpu_s"] for r in runs[label]),
            "runs": runs[label],
        }
    results["speedup_wall"] = results["pruned"]["tokens_per_s"] / results["dense"]["tokens_per_s"]
    results["speedup_worker_cpu"] = results["pruned"]["tokens_per_worker_cpu_s"] / results["dense"]["tokens_per_worker_cpu_s"]
    print(f"pruned {effective:.1%} vs dense: {results['speedup_wall']:.3f}x decode tokens/s (wall), "
          f"{results['speedup_worker_cpu']:.3f}x per worker CPU-second")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
