"""Does the first-order Taylor term help *joint* pruning? (issue 17, item 4: measure, do not ship
what does not help.)

Removing atomic expert k (scaling its output by alpha from 1 to 0) changes the loss by about
    dL_k = -T_k + c F_k / 2,   T_k = sum_t a_{t,k} dL/da_{t,k},   F_k = sum_t (a_{t,k} dL/da_{t,k})^2
(the empirical-Fisher second-order Taylor expansion; c is the loss normalisation, tokens per batch). `--method fisher` ranks by F_k alone. This probe
collects T_k in the same calibration pass and prunes the bundled model by F, by -T + c F/2, by |T| + c F/2
and by -T alone (global ranking, align 1), then prints held-out perplexity for each at each ratio.

Usage: python -m tools.probe_first_order [--ratios 0.25,0.5,0.75]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from heapr_serve.calibrate.datasets import load_calibration
    from heapr_serve.checkpoint.format import read_config
    from heapr_serve.eval.perplexity import eval_tokens, perplexity
    from heapr_serve.models import load_model, load_tokenizer
    from heapr_serve.progress import console
    from heapr_serve.prune.methods import METHODS, Method, global_allocation
    from heapr_serve.prune.options import PruneOptions
    from heapr_serve.prune.to_folder import prune_to_folder
    from heapr_serve.score.calibration_pass import collect_statistics
    from heapr_serve.score.observers import MethodStatsObserver

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(ROOT / "examples" / "tiny-qwen3-moe"))
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    args = parser.parse_args()
    source = Path(args.model)

    class FirstOrder(MethodStatsObserver):
        def __init__(self):
            super().__init__()
            self.first = {}

        def allocate(self, layer, experts):
            super().allocate(layer, experts)
            self.first[layer] = torch.zeros_like(self.stats.act_sq[layer], dtype=torch.float64)

        def gradient_sums(self, layer, expert, a, g):
            super().gradient_sums(layer, expert, a, g)
            self.first[layer][expert] += (a * g).sum(0).double()

    tokenizer = load_tokenizer(source)
    calibration = load_calibration(None, tokenizer, 64, 256, 0, int(read_config(source)["vocab_size"]))
    model = load_model(source, torch.float32, torch.device("cpu"))
    observer = FirstOrder()
    stats = collect_statistics(model, calibration.batches(8, tokenizer.pad_token_id or 0), 8.0 * 256, observer=observer)
    stats.metadata.update({"source_model": str(source), "calibration": calibration.describe()})
    fisher = {layer: f.double() for layer, f in stats.fisher.items()}
    # g is the gradient of the loss divided by c = batch x seq tokens, so the Fisher curvature of the
    # per-token likelihoods is c * F: the Taylor step needs -T + c F / 2
    scale = 8.0 * 256
    first = observer.first
    scores = {
        "F (fisher)": fisher,
        "-T + c F/2 (second-order Taylor)": {l: -first[l] + scale * fisher[l] / 2 for l in fisher},
        "|T| + c F/2": {l: first[l].abs() + scale * fisher[l] / 2 for l in fisher},
        "-T (first order alone)": {l: -first[l] for l in fisher},
    }
    tokens, _ = eval_tokens(tokenizer, None)
    dense = perplexity(model, tokens, 256, 8)
    console.print(f"dense perplexity {dense:.3f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for name, score in scores.items():
                METHODS["_probe"] = Method("_probe", name, lambda _inputs, s=score: s, global_allocation)
                out = Path(tmp) / "probe"
                prune_to_folder(source, out, stats, PruneOptions(ratio, "_probe", overwrite=True))
                ppl = perplexity(load_model(out, torch.float32, torch.device("cpu")), tokens, 256, 8)
                rows.append((ratio, name, ppl))
                console.print(f"ratio {ratio:g}  {name:34s} perplexity {ppl:.3f} ({ppl / dense - 1:+.2%})")
    del METHODS["_probe"]
    console.print("\n| ratio | score | perplexity | vs dense |\n|---:|---|---:|---:|")
    for ratio, name, ppl in rows:
        console.print(f"| {ratio:g} | {name} | {ppl:.3f} | {ppl / dense - 1:+.2%} |")


if __name__ == "__main__":
    main()
