"""Prune with HEAPr and quantize with llm-compressor's GPTQ in one `oneshot` recipe (runs in .venv-llmc).

    bash tools/setup.sh --llmcompressor
    .venv-llmc/bin/python -m tools.llmcompressor_oneshot examples/tiny-qwen3-moe -o runs/llmc-r25-w4a16 \\
        --ratio 0.25 --group-size 16
    .venv/bin/heapr-serve serve runs/llmc-r25-w4a16 --dtype bfloat16

Given a folder `heapr-serve compress` wrote, it quantizes it with GPTQ alone (the pruned experts load
through model_patches.transformers, whose experts call their Linear modules, so GPTQ sees each
expert's routed tokens). The calibration set is heapr-serve's own (`--calib/--nsamples/--seq-len/--seed`, compress's defaults),
handed to oneshot in order, so the widths are the ones `heapr-serve compress` chooses for the same
options. `--group-size 0` quantizes per output channel; `--no-quantize` prunes only. Kept widths are
multiples of the group (`--align` defaults to it), as a grouped scheme needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--method", default="heapr")
    parser.add_argument("--align", type=int, default=None, help="default: the group size (1 per channel or without quantization)")
    parser.add_argument("--group-size", type=int, default=128, help="W4A16 group size; 0 for per channel")
    parser.add_argument("--no-quantize", action="store_true")
    parser.add_argument("--calib", default=None)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    from heapr_serve.calibrate.datasets import load_calibration
    from heapr_serve.checkpoint.format import is_pruned
    from heapr_serve.models import load_tokenizer
    from heapr_serve.prune.modifier import HEAPrPruningModifier

    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    calibration = load_calibration(args.calib, tokenizer, args.nsamples, args.seq_len, args.seed, model.config.vocab_size)
    dataset = Dataset.from_dict({"input_ids": [s.tolist() for s in calibration.samples],
                                 "attention_mask": [[1] * len(s) for s in calibration.samples]})
    align = args.align or (args.group_size if args.group_size and not args.no_quantize else 1)
    recipe = [] if is_pruned(args.model) else [
        HEAPrPruningModifier(ratio=args.ratio, method=args.method, align=align, batch_size=args.batch_size, seed=args.seed)]
    if not args.no_quantize:
        strategy = {"strategy": "group", "group_size": args.group_size} if args.group_size else {"strategy": "channel"}
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False, **strategy}
        # the router (mlp.gate) stays in full precision, as `heapr-serve quantize` leaves it
        recipe.append(GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                   ignore=["lm_head", "re:.*mlp\\.gate$"]))
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(calibration.samples),
            shuffle_calibration_samples=False, moe_calibrate_all_experts=False, max_seq_length=args.seq_len)
    model.save_pretrained(str(args.out), save_compressed=not args.no_quantize)
    tokenizer.save_pretrained(str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
