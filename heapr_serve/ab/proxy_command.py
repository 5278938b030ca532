"""`heapr-serve ab-proxy`: the command line of the A/B proxy (heapr_serve.ab.proxy): its flags (their
ranges declared on them, so click refuses a bad value in one line naming the flag), the checks
click cannot make (URLs, flags that need or exclude each other, a free port), and the server it runs."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import typer

from heapr_serve.ab.number_flags import finite, positive
from heapr_serve.ab.proxy import ABProxy, ProxyConfig
from heapr_serve.ab.ramp import RampChecks, parse_steps
from heapr_serve.ab.wire import PROXY_KEY_HEADER
from heapr_serve.errors import HeaprError
from heapr_serve.preflight import check_output


def _check_url(flag: str, url: str) -> str:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  (ValueError for a port that is not a number in 0..65535)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise HeaprError(f"{flag} {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000")
    return url


def ab_proxy_command(
    a: str = typer.Option(..., "--a", help="URL of arm A (the dense baseline), e.g. http://127.0.0.1:8001"),
    b: str = typer.Option(..., "--b", help="URL of arm B (the pruned model), e.g. http://127.0.0.1:8002"),
    share_b: Optional[float] = typer.Option(None, "--share-b", min=0, max=1,
                                            help="Fraction of requests sent to B, 0..1 (default 0.1)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port to listen on."),
    sticky_header: Optional[str] = typer.Option(
        None, "--sticky-header", help="Assign by a hash of this request header (e.g. X-User-Id), "
        "so a user always gets the same arm; requests without it are assigned at random."),
    model_a: Optional[str] = typer.Option(None, "--model-a", help="Rewrite the request's `model` to "
                                          "this when it goes to A (arms serving different names)."),
    model_b: Optional[str] = typer.Option(None, "--model-b", help="Same for B."),
    proxy_key: Optional[str] = typer.Option(
        None, "--proxy-key", envvar="HEAPR_PROXY_KEY", help=f"Require this value in the "
        f"{PROXY_KEY_HEADER} header (Authorization still passes through to the arms)."),
    connect_timeout: float = typer.Option(5.0, "--connect-timeout", callback=positive,
                                          help="Seconds to connect to an arm."),
    timeout: float = typer.Option(300.0, "--timeout", callback=positive, help="Seconds until an arm's "
                                  "answer starts (a stream's first chunk, or a whole non-streaming answer); 504 after."),
    idle_timeout: float = typer.Option(60.0, "--idle-timeout", callback=positive, help="Longest silence of "
                                       "an arm within a stream (a stream that keeps producing is never cut)."),
    client_timeout: float = typer.Option(30.0, "--client-timeout", callback=positive, help="Seconds a client "
                                         "may take to send its request, and to take each response chunk."),
    max_connections: Optional[int] = typer.Option(
        None, "--max-connections", min=1, help="Connection pool size per arm (default: --max-inflight, "
        "so neither arm's requests wait for a connection)."),
    max_inflight: int = typer.Option(1024, "--max-inflight", min=1, help="Concurrent client requests "
                                     "before the proxy answers 503."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", callback=positive,
                                      help="Largest request body accepted."),
    no_failover: bool = typer.Option(False, "--no-failover", help="Answer 502/504 instead of "
                                     "sending a failed request to the other arm."),
    health_interval: float = typer.Option(2.0, "--health-interval", callback=positive,
                                          help="Seconds between /health checks."),
    log_requests: bool = typer.Option(False, "--log-requests", help="One line per request (arm, "
                                      "status, latency; never the prompt)."),
    shadow_rate: float = typer.Option(0.0, "--shadow-rate", min=0, max=1, help="Share of requests that both "
                                      "arms also answer greedily, to compare their outputs (the user gets the "
                                      "assigned arm's answer only)."),
    shadow_max_inflight: int = typer.Option(8, "--shadow-max-inflight", min=1, help="Shadow comparisons at "
                                            "once; more are dropped (and counted)."),
    shadow_max_tokens: int = typer.Option(64, "--shadow-max-tokens", min=1, help="Tokens of each shadow answer."),
    ramp: Optional[str] = typer.Option(None, "--ramp", help="Guarded ramp of B's share, in percent, e.g. "
                                       "5,25,50,100: one step up each time B passes the --slo-* checks, 0 at "
                                       "once when one fails (replaces --share-b)."),
    step_after: int = typer.Option(200, "--step-after", min=1,
                                   help="--ramp: B's requests in a window before its checks run."),
    ramp_state: Optional[Path] = typer.Option(None, "--ramp-state", help="--ramp: state file (written "
                                              "atomically) a restarted proxy resumes from."),
    slo_latency_ratio: float = typer.Option(1.25, "--slo-latency-ratio", min=0, callback=finite,
                                            help="--ramp: B's median E2E (and TTFT) at most this times A's."),
    slo_error_rate: float = typer.Option(0.01, "--slo-error-rate", min=0, callback=finite,
                                         help="--ramp: B's error rate at most this above A's."),
    slo_agreement: float = typer.Option(0.0, "--slo-agreement", min=0, callback=finite,
                                        help="--ramp with --shadow-rate: least share of identical greedy answers."),
    slo_logprob_gap: Optional[float] = typer.Option(
        None, "--slo-logprob-gap", min=0, callback=finite,
        help="--ramp with --shadow-rate: largest mean log-likelihood gap per token (nats)."),
) -> None:
    """OpenAI-compatible reverse proxy that splits live traffic between A and B and exports metrics."""
    import uvicorn

    from heapr_serve.ab.http_server import server_config

    _check_url("--a", a)
    _check_url("--b", b)
    max_body_bytes = int(max_body_mb * (1 << 20))
    if max_body_bytes < 1:
        raise HeaprError(f"--max-body-mb {max_body_mb:g} is less than a byte; give e.g. 16")
    steps = None
    if ramp is not None:
        if share_b is not None:
            raise HeaprError("--ramp sets B's share step by step; drop --share-b")
        steps = parse_steps(ramp)
        if (slo_agreement > 0 or slo_logprob_gap is not None) and shadow_rate == 0:
            raise HeaprError("--slo-agreement and --slo-logprob-gap check shadow comparisons; add --shadow-rate (e.g. 0.05)")
        if ramp_state is not None:
            check_output("--ramp-state", ramp_state, kind="file", overwrite=True)
    elif any(v is not None for v in (ramp_state, slo_logprob_gap)) or slo_agreement:
        raise HeaprError("--ramp-state and --slo-* shape a ramp; add --ramp (e.g. 5,25,50,100)")
    checks = RampChecks(slo_latency_ratio, slo_error_rate, slo_agreement,
                        float("inf") if slo_logprob_gap is None else slo_logprob_gap)
    cfg = ProxyConfig(a_url=a, b_url=b, share_b=0.1 if share_b is None else share_b, sticky_header=sticky_header,
                      model_a=model_a, model_b=model_b, proxy_key=proxy_key or None,
                      connect_timeout=connect_timeout, timeout=timeout, idle_timeout=idle_timeout,
                      client_timeout=client_timeout, max_inflight=max_inflight,
                      max_connections=max_connections, max_body_bytes=max_body_bytes,
                      failover=not no_failover, health_interval=health_interval,
                      log_requests=log_requests, shadow_rate=shadow_rate,
                      shadow_max_inflight=shadow_max_inflight, shadow_max_tokens=shadow_max_tokens,
                      ramp_steps=steps, step_after=step_after, ramp_state=None if ramp_state is None else str(ramp_state),
                      ramp_checks=checks)
    proxy = ABProxy(cfg)  # (a --ramp-state it cannot resume from is refused here, before listening)
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise HeaprError(f"--host {host} --port {port}: cannot listen ({exc.strerror}); "
                             "pick a free port") from None
    print(f"ab-proxy: listening on http://{host}:{port}  A={cfg.a_url}  B={cfg.b_url}  "
          + (f"ramp={ramp} (now {proxy.share_b():g})" if ramp else f"share_b={cfg.share_b:g}")
          + (f"  sticky={sticky_header}" if sticky_header else "") + (f"  shadow={shadow_rate:g}" if shadow_rate else ""),
          file=sys.stderr, flush=True)
    config = server_config(proxy.app, host, port, cfg.client_timeout, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
