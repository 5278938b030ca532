"""Healing settings against perplexity: calibrate once, then prune and heal with each setting.

Why: `--heal`'s defaults (docs/quality.md, "Healing") are chosen by measurement, and one calibration
shared by every setting is what makes the rows comparable. Each setting goes through
`to_folder.prune_to_folder` (the path `compress` takes) and is evaluated on the quality table's
held-out text. A setting is JSON: `ratio`, `method` (default heapr), `reconstruct` (the least-squares
start), then any `HealOptions` field (`steps`, `lr`, `router`, `target`, `e2e_steps`, `e2e_lr`, ...);
`"heal": false` prunes (and re-fits) without healing.

Usage:
    python -m tools.heal_sweep --settings '[{"ratio": 0.5}, {"ratio": 0.5, "method": "fisher", "reconstruct": true, "lr": 1e-3}]'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tools.quality_table import DEFAULT_MODEL, calibrate  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    from rich.table import Table

    from heapr_serve.eval.perplexity import eval_tokens, perplexity
    from heapr_serve.models import load_model, load_tokenizer
    from heapr_serve.progress import console
    from heapr_serve.prune.heal import HealOptions
    from heapr_serve.prune.options import PruneOptions
    from heapr_serve.prune.to_folder import RetuneRun, prune_to_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    parser.add_argument("--settings", required=True, help="JSON list of settings (see above)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256, help="perplexity window")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    try:
        settings = json.loads(args.settings)
        assert isinstance(settings, list) and all(isinstance(s, dict) and "ratio" in s for s in settings)
    except (ValueError, AssertionError):
        raise SystemExit("error: --settings: give a JSON list of objects, each with a ratio, e.g. '[{\"ratio\": 0.5}]'")
    source = Path(args.model)
    stats, batches = calibrate(source, args.nsamples, args.calib_seq_len, 8, 0)
    tokens, _ = eval_tokens(load_tokenizer(source), None)
    table = Table(title=f"{source.name}: healing settings ({args.nsamples} x {args.calib_seq_len} calibration tokens)")
    for col in ("ratio", "method", "start", "heal settings", "perplexity", "wall s"):
        table.add_column(col, justify="right" if col in ("perplexity", "wall s", "ratio") else "left")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, setting in enumerate(settings):
            s = dict(setting)
            ratio, method, refit = s.pop("ratio"), s.pop("method", "heapr"), s.pop("reconstruct", False)
            heal = HealOptions(**s) if s.pop("heal", True) else None
            options = PruneOptions(ratio, method, overwrite=True, reconstruct=refit, heal=heal)
            retune = RetuneRun(batches, torch.float32, torch.device("cpu")) if options.retunes else None
            start = time.perf_counter()
            prune_to_folder(source, Path(tmp) / str(i), stats, options, retune)
            wall = time.perf_counter() - start
            ppl = perplexity(load_model(Path(tmp) / str(i), torch.float32, torch.device("cpu")), tokens, args.seq_len, 8)
            rows.append({**setting, "ppl": ppl, "wall_s": round(wall, 1)})
            table.add_row(f"{ratio:g}", method, "least squares" if refit else "pruned", json.dumps(s) if heal else "no healing",
                          f"{ppl:.3f}", f"{wall:.1f}")
            console.print(f"{json.dumps(setting)}: perplexity {ppl:.3f}, {wall:.1f} s", highlight=False)
    console.print(table)
    if args.out is not None:
        args.out.write_text(json.dumps({"model": str(source), "nsamples": args.nsamples, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
