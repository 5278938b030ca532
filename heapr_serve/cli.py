"""The `heapr-serve` command line: compress, apply, quantize, inspect, eval, serve, bench, ab-proxy.

Each command lives in its own module; this file only wires them into one Typer app and turns the
project's expected errors (`HeaprError`) into a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer
try:  # typer >= 0.26 carries its own copy of click
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click
from typer.exceptions import Abort
from rich.console import Console

from heapr_serve.errors import HeaprError

app = typer.Typer(
    name="heapr-serve",
    help="HEAPr atomic-expert pruning for MoE LLMs, and serving the result in vLLM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- command registrations, in stage order (each stage's module owns its command) ---
from heapr_serve.prune.compress import compress_command  # noqa: E402
from heapr_serve.prune.apply import apply_command  # noqa: E402
from heapr_serve.checkpoint.inspect import inspect_command  # noqa: E402
from heapr_serve.quantize.command import quantize_command  # noqa: E402
from heapr_serve.eval.command import eval_command  # noqa: E402
from heapr_serve.serve import serve_command  # noqa: E402
from heapr_serve.ab.bench_command import bench_command  # noqa: E402
from heapr_serve.ab.proxy_command import ab_proxy_command  # noqa: E402

app.command("compress")(compress_command)
app.command("apply")(apply_command)
app.command("quantize")(quantize_command)
app.command("inspect")(inspect_command)
app.command("eval")(eval_command)
app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve_command)
app.command("bench")(bench_command)
app.command("ab-proxy")(ab_proxy_command)
# --- end of command registrations ---


def _say(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)


def main() -> None:
    """Console-script entry point: run the app; report HeaprError, a bad flag value (click's usage
    errors) and any stray OS error as one line with exit code 2."""
    from rich.markup import escape

    from heapr_serve.score import distributed

    try:
        code = app(standalone_mode=False)
    except HeaprError as err:
        ranks = distributed.ranks_from_env()
        if not distributed.is_quiet_rank():  # under torchrun, bad input is said once, by rank 0
            where = f"rank {ranks.rank}: " if ranks.world > 1 else ""
            _say(escape(f"{where}{err}"))
        sys.exit(2)
    except click.ClickException as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # the help was printed already
            sys.exit(err.exit_code)
        ctx = getattr(err, "ctx", None)
        usage = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _say(escape(" ".join(err.format_message().split()) + usage))
        sys.exit(2)
    except Abort:
        sys.exit(130)
    except OSError as err:  # every writer turns its own into a HeaprError; this is the net under them
        _say(escape(f"{err.filename or 'I/O'}: {err.strerror or err}; check the path and free disk space"))
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
