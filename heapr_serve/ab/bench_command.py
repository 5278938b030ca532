"""`heapr-serve bench`: the command line of the A/B benchmark (heapr_serve.ab.bench): its flags,
their one-line checks, the arms it serves itself, and the files it leaves in --out."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlsplit

import typer

from heapr_serve.ab.bench import BenchArm, Plan, run_bench
from heapr_serve.ab.bench_prompts import load_prompt_file
from heapr_serve.ab.local_vllm import LocalVllmServer
from heapr_serve.ab.metrics import ABMetrics
from heapr_serve.ab.number_flags import finite, positive
from heapr_serve.ab.report import write_reports
from heapr_serve.errors import HeaprError
from heapr_serve.preflight import check_output, staged_folder


def _parse_levels(flag: str, text: str, integer: bool) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeaprError(f"{flag} {text!r}: give comma-separated numbers, e.g. 1,4,16") from None
    if not vals or any(v <= 0 for v in vals) or (integer and any(v != int(v) for v in vals)):
        kind = "positive integers" if integer else "positive numbers"
        raise HeaprError(f"{flag} {text!r}: give comma-separated {kind}, e.g. 1,4,16")
    return vals


def _arm_source(flag: str, value: str) -> tuple[str, Optional[Path]]:
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise HeaprError(f"{flag} {value!r}: URL without a host; give e.g. http://127.0.0.1:8000")
        return value.rstrip("/"), None
    path = Path(value)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HeaprError(f"{flag} {value}: folder has no config.json; give a checkpoint folder "
                             "or a server URL")
        return "", path
    raise HeaprError(f"{flag} {value!r}: neither an http(s) URL nor a checkpoint folder")


def bench_command(
    a: str = typer.Option(..., "--a", help="Arm A (dense baseline): server URL, or checkpoint "
                          "folder to serve here with vLLM."),
    b: str = typer.Option(..., "--b", help="Arm B (pruned): server URL or checkpoint folder."),
    concurrency: str = typer.Option("1,4,16", "--concurrency", help="Comma-separated concurrency "
                                    "levels (closed loop)."),
    request_rate: Optional[str] = typer.Option(None, "--request-rate", help="Comma-separated "
                                               "request rates in req/s (Poisson arrivals); "
                                               "replaces --concurrency."),
    max_concurrency: int = typer.Option(64, "--max-concurrency", min=1, help="Cap on requests in "
                                        "flight in --request-rate mode."),
    num_prompts: int = typer.Option(32, "--num-prompts", min=1, help="Requests per arm per level."),
    input_len: int = typer.Option(128, "--input-len", min=1, help="Synthetic prompt length in tokens."),
    output_len: int = typer.Option(64, "--output-len", min=1, help="Output tokens per request."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", exists=True, dir_okay=False,
                                           help="Prompt file instead of synthetic prompts: .txt "
                                           "(one per line) or .jsonl."),
    endpoint: Literal["completions", "chat"] = typer.Option("completions", "--endpoint",
                                                            help="completions or chat."),
    schedule: Literal["alternate", "concurrent"] = typer.Option(
        "alternate", "--schedule", help="alternate (ABBA blocks, one arm at a time) or concurrent "
        "(both arms at once)."),
    blocks: int = typer.Option(4, "--blocks", min=1, help="Blocks per level for --schedule alternate."),
    settle: float = typer.Option(2.0, "--settle", min=0, callback=finite, help="Idle seconds before "
                                 "each alternate block: a vLLM server keeps polling for work ~1 s after its "
                                 "last step, which would slow the next arm on a machine with few cores."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Unmeasured requests per arm first, one at a "
                               "time (then one burst at the top concurrency); 0 for none."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos", help="Pin output "
                                    "lengths (vLLM's ignore_eos) so both arms generate the same."),
    timeout: float = typer.Option(600.0, "--timeout", callback=positive, help="Seconds per request."),
    out: Path = typer.Option(Path("runs/ab-bench"), "--out", help="Folder for results.json, "
                             "results.md, plot.png, metrics.prom and server logs."),
    model_a: Optional[str] = typer.Option(None, "--model-a", help="Model id for A (default: "
                                          "the first of its /v1/models)."),
    model_b: Optional[str] = typer.Option(None, "--model-b", help="Model id for B."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY",
                                          help="Bearer key sent to both arms."),
    server_arg: list[str] = typer.Option([], "--server-arg", help="Extra vLLM server argument "
                                         "for arms given as folders; repeat, e.g. "
                                         "--server-arg=--max-model-len=2048."),
    server_timeout: float = typer.Option(900.0, "--server-timeout", callback=positive,
                                         help="Seconds to wait for a served folder's /health."),
    kv_cache_gib: float = typer.Option(2.0, "--kv-cache-gib", callback=positive, help="KV cache per "
                                       "served folder on CPU (VLLM_CPU_KVCACHE_SPACE, if not set already)."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=1, max=65535, help="Also "
                                               "serve the heapr_ab_* metrics on this port while running."),
    seed: int = typer.Option(0, "--seed", help="Seed for synthetic prompts and arrivals."),
    confidence: float = typer.Option(0.95, "--confidence", min=0.5, max=0.9999, help="Confidence of each level's "
                                     "B/A intervals, all of them together (a level with six ratios and 0.95 is "
                                     "wrong about one of them at most 5% of the time)."),
) -> None:
    """Benchmark dense (A) against pruned (B) on the same prompts; writes JSON, Markdown and a plot."""
    if request_rate:
        mode, levels = "rate", _parse_levels("--request-rate", request_rate, integer=False)
    else:
        mode, levels = "concurrency", _parse_levels("--concurrency", concurrency, integer=True)
    url_a, dir_a = _arm_source("--a", a)
    url_b, dir_b = _arm_source("--b", b)
    prompt_items = load_prompt_file(prompts) if prompts else None
    if metrics_port is not None:
        _check_port_free("--metrics-port", metrics_port)
    check_output("--out", out, kind="folder", merge=True)  # written only at the end, staged
    plan = Plan(mode=mode, levels=levels, num_prompts=num_prompts, schedule=schedule,
                blocks=blocks, max_concurrency=max_concurrency, endpoint=endpoint,
                output_len=output_len, input_len=input_len, ignore_eos=ignore_eos,
                warmup=warmup, seed=seed, settle=settle, confidence=confidence)
    arms = {"a": BenchArm("a", url_a, model_a or "", source=a), "b": BenchArm("b", url_b, model_b or "", source=b)}
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    metrics = ABMetrics()

    def _terminate(signum, _frame):  # SIGTERM: unwind through the finally that stops servers
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _terminate)
    logs = Path(tempfile.mkdtemp(prefix="heapr-bench-logs-")) if dir_a or dir_b else None  # kept there if vLLM fails
    with staged_folder("--out", out, merge=True) as staging, ExitStack() as stack:
        servers = []
        for name, folder in (("a", dir_a), ("b", dir_b)):
            if folder is None:
                continue
            served = folder.resolve().name
            if name == "b" and dir_a is not None and served == dir_a.resolve().name:
                served += "-b"
            env = {} if "VLLM_CPU_KVCACHE_SPACE" in os.environ else {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib)))}
            srv = LocalVllmServer(folder, served_name=model_a if name == "a" and model_a else
                                  model_b if name == "b" and model_b else served,
                                  extra=server_arg, log=logs / f"server-{name}.log", env=env,
                                  startup_timeout=server_timeout)
            stack.callback(srv.stop)
            srv.start()
            servers.append((name, srv))
            arms[name].url, arms[name].model, arms[name].served_here = srv.url, srv.served_name, True
        for name, srv in servers:
            print(f"bench: waiting for vLLM serving {srv.folder} as arm {name.upper()} on {srv.url} "
                  f"(log: {srv.log})", file=sys.stderr, flush=True)
            srv.wait_ready()
        if metrics_port:
            from prometheus_client import start_http_server

            try:
                httpd, _ = start_http_server(metrics_port, addr="127.0.0.1",
                                             registry=metrics.registry)
            except OSError as exc:
                raise HeaprError(f"--metrics-port {metrics_port}: cannot listen ({exc.strerror}); "
                                 "pick a free port") from None
            stack.callback(httpd.server_close)
            stack.callback(httpd.shutdown)  # (callbacks run last-in first-out)
        run = asyncio.run(run_bench(arms, plan, prompt_items, headers, metrics, timeout, staging))
        stack.close()  # servers stopped: their logs are complete
        if logs is not None:
            for log in sorted(logs.iterdir()):
                shutil.move(str(log), staging / log.name)
            logs.rmdir()
        md, plotted = write_reports(staging, arms, plan, prompts, metrics, run)
    signal.signal(signal.SIGTERM, old)
    print(md)
    plot = f"{out / 'plot.png'}, " if plotted else ""
    print(f"bench: wrote {out / 'results.json'}, {out / 'results.md'}, {plot}{out / 'metrics.prom'}"
          + ("" if plotted else " (no plot: install heapr-serve[plot] for matplotlib)"), file=sys.stderr)


def _check_port_free(flag: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise HeaprError(f"{flag} {port}: cannot listen ({exc.strerror}); pick a free port") from None
