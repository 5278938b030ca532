"""`--overwrite` replaces the output in two renames (heapr_serve.folder_swap). A process killed between
them loses nothing: the previous output waits whole beside the destination, the next run puts it back
before anything else, and a later `--overwrite` replaces it and leaves no stray folder."""

import hashlib
import json
import os
import subprocess
import sys

from conftest import ROOT, run_cli

FAST = ["--nsamples", "4", "--seq-len", "32", "--batch-size", "2"]

# the real entry point, killed (os._exit: no cleanup, as by SIGKILL) between setting the old output
# aside and putting the new one in its place
KILLED_BETWEEN_RENAMES = """
import os, sys
import heapr_serve.folder_swap as swap
swap.put_in_place = lambda new, out: os._exit(17)
from heapr_serve.cli import main
sys.argv = ["heapr-serve", *sys.argv[1:]]
main()
"""


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _killed_compress(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, "compress", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 17, done.stderr


def test_a_run_killed_between_the_renames_loses_nothing(tmp_path, tiny_models, capsys):
    src, out = tiny_models["qwen3_moe"], tmp_path / "pruned"
    assert run_cli("compress", src, "-o", out, "--ratio", "0.25", *FAST, capsys=capsys)[0] == 0
    old = _digest(out)

    _killed_compress(src, "-o", out, "--ratio", "0.5", "--overwrite", *FAST)
    aside = tmp_path / ".pruned.heapr-replaced"
    assert not out.exists() and _digest(aside) == old  # set aside whole, under a name that says what it is

    # the next run puts it back before it looks at the output: here it is refused as usual, intact
    code, _, err = run_cli("compress", src, "-o", out, "--ratio", "0.5", *FAST, capsys=capsys)
    assert code == 2 and ".pruned.heapr-replaced" in err and "back in place" in err and "already exists" in err, err
    assert _digest(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # and the dead run's staging folder is gone

    _killed_compress(src, "-o", out, "--ratio", "0.5", "--overwrite", *FAST)
    code, _, err = run_cli("compress", src, "-o", out, "--ratio", "0.5", "--overwrite", *FAST, capsys=capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["heapr"]["ratio"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
