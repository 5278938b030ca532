"""Shared fixtures: tiny random models of every family, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import heapr_serve  # noqa: E402,F401  (installs the transformers patch)
from tools.build_tiny_models import CONFIGS, build_tiny_model, tokenizer  # noqa: E402

FAMILIES = list(CONFIGS)
EXAMPLE_MODEL = ROOT / "examples" / "tiny-qwen3-moe"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    """family -> folder of a random tiny model (float32, per-expert tensors as transformers saves)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny_model(family, root / family, seed=1, tok=tiny_tokenizer) for family in FAMILIES}


def run_cli(*args: str, capsys=None) -> tuple[int, str, str]:
    """Run the real console entry point in-process; return (exit code, stdout, stderr). Without
    `capsys` (module-scoped fixtures have none) the output is captured by redirecting sys.stdout/err."""
    import contextlib
    import io

    from heapr_serve import cli

    argv = sys.argv
    sys.argv = ["heapr-serve", *map(str, args)]
    code = 0
    out, err = io.StringIO(), io.StringIO()
    redirect = contextlib.nullcontext() if capsys is not None else contextlib.ExitStack()
    with redirect as stack:
        if capsys is None:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
        try:
            cli.main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.argv = argv
    if capsys is None:
        return code, out.getvalue(), err.getvalue()
    captured = capsys.readouterr()
    return code, captured.out, captured.err
