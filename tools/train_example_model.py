"""Train the bundled example model `examples/tiny-qwen3-moe` from scratch on the built-in text.

Why: tests, docs and demos need a real Qwen3-MoE checkpoint whose experts have learned something, so
that pruning visibly costs perplexity, yet small enough to commit and to train on a laptop CPU with
no download. The text is Python's language reference shipped inside CPython (`builtin_text`); its
held-out split is used only for the final evaluation, never for training.

Everything is seeded (weights, batch sampling, the random-pruning probe), so the same command on the
same torch build gives the same model. Usage (the exact command that built the committed folder is in
its README.md):

    python tools/train_example_model.py examples/tiny-qwen3-moe
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# Run as `python tools/train_example_model.py` from the repository root, `tools` must be importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from heapr_serve.calibrate.builtin_text import builtin_text, text_sha256
from heapr_serve.score.moe_forward import use_sorted_forward
from tools.make_tokenizer import build_tokenizer

VOCAB = 4096
console = Console()


def build_config(args, eos_id: int):
    """A Qwen3-MoE config within vLLM's CPU limits: head_dim 64, 32-aligned hidden and expert widths."""
    assert args.hidden % 32 == 0 and args.width % 32 == 0, "hidden and expert width must be multiples of 32"
    return AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.width,
        intermediate_size=args.width * 4,  # unused: every layer is sparse (decoder_sparse_step=1)
        decoder_sparse_step=1,
        norm_topk_prob=True,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,  # turned on per call during training only
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=None,
        initializer_range=0.02,
    )


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of the training stream (random offsets act as light data augmentation)."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int, batch: int = 8) -> float:
    """Token-weighted PPL over non-overlapping `seq_len` windows (the tail shorter than a window dropped)."""
    model.eval()
    n = stream.numel() // seq_len
    windows = stream[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def routing_share(model, stream: torch.Tensor, seq_len: int) -> list[list[float]]:
    """Per layer, the fraction of top-k assignments each expert received on `stream`."""
    shares: dict[int, torch.Tensor] = {}
    hooks = []
    for layer_idx, layer in enumerate(model.model.layers):
        def hook(_m, _inp, out, layer_idx=layer_idx):
            idx = out[2].reshape(-1)
            counts = torch.bincount(idx, minlength=model.config.num_experts).float()
            shares[layer_idx] = shares.get(layer_idx, 0) + counts
        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        perplexity(model, stream, seq_len)
    finally:
        for h in hooks:
            h.remove()
    return [(shares[i] / shares[i].sum()).tolist() for i in sorted(shares)]


@torch.no_grad()
def random_prune_ppl(model, stream: torch.Tensor, seq_len: int, ratio: float, seed: int) -> float:
    """Sanity probe: PPL with `ratio` of every expert's neurons zeroed at random (on a copy of the weights)."""
    gen = torch.Generator().manual_seed(seed)
    saved = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        saved.append((experts.gate_up_proj.clone(), experts.down_proj.clone()))
        width = experts.down_proj.shape[-1]
        drop = int(round(ratio * width))
        for e in range(experts.down_proj.shape[0]):
            gone = torch.randperm(width, generator=gen)[:drop]
            experts.gate_up_proj[e, gone] = 0
            experts.gate_up_proj[e, width + gone] = 0
            experts.down_proj[e, :, gone] = 0
    try:
        return perplexity(model, stream, seq_len)
    finally:
        for layer, (gu, d) in zip(model.model.layers, saved):
            layer.mlp.experts.gate_up_proj.copy_(gu)
            layer.mlp.experts.down_proj.copy_(d)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def write_card(out: Path, facts: dict) -> None:
    f = facts
    shares = f["routing_share"]
    rows = "\n".join(
        f"| {i} | {min(s) * 100:.1f}% | {max(s) * 100:.1f}% | {sum(1 for x in s if x < 0.25 / len(s))} |"
        for i, s in enumerate(shares)
    )
    prune_rows = "\n".join(
        f"| random {round(float(r) * 100)}% of every expert's neurons zeroed | {ppl:.2f} | {100 * (ppl / f['ppl_dense'] - 1):+.1f}% |"
        for r, ppl in f["random_prune_ppl"].items()
    )
    card = f"""# tiny-qwen3-moe: the bundled example model

A small Qwen3-MoE (`model_type: qwen3_moe`) trained from scratch by
`tools/train_example_model.py`, so heapr-serve's tests, docs and demos have a real MoE whose experts
have learned something: pruning it costs measurable perplexity. It is a toy, trained on one small text;
it writes Python-reference-flavoured English and nothing more.

## Architecture

| field | value |
|---|---|
| hidden size | {f['hidden']} |
| layers (all MoE) | {f['layers']} |
| attention heads / KV heads / head_dim | {f['heads']} / {f['kv_heads']} / 64 |
| routed experts / top-k | {f['experts']} / {f['top_k']} (norm_topk_prob) |
| expert width (moe_intermediate_size) | {f['width']} |
| vocabulary | {VOCAB} (byte-level BPE from `tools/make_tokenizer.py`; `<|endoftext|>` = id {f['eos_id']} is EOS and PAD) |
| tied embeddings | yes |
| parameters | {f['params']:,} (routed experts: {f['expert_params']:,}) |
| weights dtype on disk | {f['dtype']} |

## Training

- Data: `heapr_serve.calibrate.builtin_text.builtin_text("train")` — Python's language reference
  (`pydoc_data.topics`, shipped in every CPython), {f['train_tokens']:,} tokens, sha256 of the text
  `{f['train_sha']}`. The held-out split (`builtin_text("test")`, {f['test_tokens']:,} tokens) was never
  trained on.
- {f['steps']} steps of AdamW (lr {f['lr']}, betas (0.9, 0.95), weight decay {f['wd']}, gradient clip 1.0),
  {f['warmup']} warm-up steps then cosine decay to 10%; batches of {f['batch']} random windows of
  {f['seq_len']} tokens ({f['steps'] * f['batch'] * f['seq_len']:,} tokens seen, about
  {f['steps'] * f['batch'] * f['seq_len'] / f['train_tokens']:.0f} passes); router load-balancing loss
  with coefficient {f['aux_coef']}; seed {f['seed']}; float32 training on {f['threads']} CPU thread(s), using
  heapr-serve's sorted MoE forward.
- Final training loss (LM part, mean of the last 20 steps): {f['final_train_loss']:.3f}.
- Wall time: {f['wall_s'] / 60:.1f} min on a shared 2-core CPU (torch {f['torch']}, transformers {f['transformers']}).

## Held-out quality

Perplexity on `builtin_text("test")`, non-overlapping {f['seq_len']}-token windows, weights as saved
({f['dtype']}) computed in float32:

| model | held-out PPL | vs dense |
|---|---|---|
| dense | {f['ppl_dense']:.2f} | — |
{prune_rows}

Routing on the held-out text (share of top-{f['top_k']} assignments per expert; uniform would be
{100 / f['experts']:.2f}%):

| layer | least used expert | most used expert | experts below a quarter of uniform |
|---|---|---|---|
{rows}

The full per-expert shares are in `training_facts.json`.

## Rebuild

```
{f['command']}
```
"""
    (out / "README.md").write_text(card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--aux-coef", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="print held-out PPL every N steps (monitoring only; it does not steer training)")
    parser.add_argument("--threads", type=int, default=1,
                        help="1 by default: on a busy shared CPU two OpenMP threads spin-wait and run 5-10x slower")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--max-mb", type=float, default=15.0, help="refuse to finish above this folder size")
    args = parser.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = build_tokenizer(VOCAB)
    eos_id = tok.convert_tokens_to_ids("<|endoftext|>")
    train_text, test_text = builtin_text("train"), builtin_text("test")
    train = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    test = torch.tensor(tok(test_text)["input_ids"], dtype=torch.long)

    config = build_config(args, eos_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    use_sorted_forward(model)
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    console.print(f"{params:,} parameters ({expert_params:,} in routed experts); "
                  f"{train.numel():,} training tokens, {test.numel():,} held-out tokens")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    recent: list[float] = []
    start = time.time()
    model.train()
    columns = [TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=args.steps, info="")
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            ids = sample_batch(train, args.batch, args.seq_len, gen)
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
            lm_loss = out.loss - args.aux_coef * out.aux_loss
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            recent = (recent + [lm_loss.item()])[-20:]
            if step % 10 == 0 or step == args.steps - 1:
                progress.update(task, info=f"loss {sum(recent) / len(recent):.3f} aux {out.aux_loss.item():.3f}")
            progress.advance(task)
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                progress.console.print(f"step {step + 1}: train loss {sum(recent) / len(recent):.3f}, "
                                       f"held-out PPL {perplexity(model, test, args.seq_len):.2f}")
                model.train()
    wall = time.time() - start
    final_loss = sum(recent) / len(recent)

    # Evaluate the weights exactly as they will be stored.
    model = model.to(getattr(torch, args.dtype)).to(torch.float32)
    model.eval()
    ppl = perplexity(model, test, args.seq_len)
    shares = routing_share(model, test, args.seq_len)
    pruned = {r: random_prune_ppl(model, test, args.seq_len, r, args.seed) for r in (0.25, 0.5)}
    console.print(f"train loss {final_loss:.3f} (train PPL {math.exp(final_loss):.2f}); "
                  f"held-out PPL dense {ppl:.2f}, random-25% {pruned[0.25]:.2f}, random-50% {pruned[0.5]:.2f}; "
                  f"{wall / 60:.1f} min")
    for i, s in enumerate(shares):
        console.print(f"layer {i} routing share: " + " ".join(f"{100 * x:.1f}" for x in s))

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(getattr(torch, args.dtype)).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False, max_new_tokens=64).save_pretrained(args.out)
    command = "python tools/train_example_model.py " + " ".join(str(a) for a in sys.argv[1:])
    facts = dict(
        hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, experts=args.experts,
        top_k=args.top_k, width=args.width, eos_id=eos_id, params=params, expert_params=expert_params,
        dtype=args.dtype, train_tokens=train.numel(), test_tokens=test.numel(), train_sha=text_sha256(train_text),
        steps=args.steps, lr=args.lr, wd=args.wd, warmup=args.warmup, batch=args.batch, seq_len=args.seq_len,
        aux_coef=args.aux_coef, seed=args.seed, threads=args.threads, final_train_loss=final_loss, wall_s=wall,
        torch=torch.__version__, transformers=transformers.__version__, ppl_dense=ppl,
        random_prune_ppl=pruned, routing_share=shares, command=command,
    )
    (args.out / "training_facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    write_card(args.out, facts)
    size_mb = sum(p.stat().st_size for p in args.out.iterdir()) / 1e6
    console.print(f"wrote {args.out} ({size_mb:.1f} MB)")
    if size_mb > args.max_mb:
        raise SystemExit(f"{args.out} is {size_mb:.1f} MB, above --max-mb {args.max_mb}")


if __name__ == "__main__":
    main()
