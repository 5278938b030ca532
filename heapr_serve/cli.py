"""The `heapr-serve` command line: compress, apply, inspect, eval, serve, bench, ab-proxy.

Each command lives in its own module; this file only wires them into one Typer app and turns the
project's expected errors (`HeaprError`) into a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer
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
from heapr_serve.prune.commands import apply_command, compress_command  # noqa: E402
from heapr_serve.checkpoint.inspect import inspect_command  # noqa: E402
from heapr_serve.eval.command import eval_command  # noqa: E402
from heapr_serve.serve import serve_command  # noqa: E402
from heapr_serve.ab.bench import bench_command  # noqa: E402
from heapr_serve.ab.proxy import ab_proxy_command  # noqa: E402

app.command("compress")(compress_command)
app.command("apply")(apply_command)
app.command("inspect")(inspect_command)
app.command("eval")(eval_command)
app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve_command)
app.command("bench")(bench_command)
app.command("ab-proxy")(ab_proxy_command)
# --- end of command registrations ---


def main() -> None:
    """Console-script entry point: run the app, report HeaprError as one line."""
    from heapr_serve.score import distributed

    try:
        app(standalone_mode=True)
    except HeaprError as err:
        ranks = distributed.ranks_from_env()
        if not distributed.is_quiet_rank():  # under torchrun, bad input is said once, by rank 0
            where = f"rank {ranks.rank}: " if ranks.world > 1 else ""
            Console(stderr=True).print(f"[bold red]error:[/] {where}{err}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
