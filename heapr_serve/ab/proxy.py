"""`heapr-serve ab-proxy`: split live OpenAI traffic between a dense (A) and a pruned (B) deployment.

Why a proxy and not client-side sampling: the comparison must run on the same live traffic, and the
clients must not change. So each request is assigned to an arm (randomly with probability
`--share-b`, or by hashing a sticky header so one user always sees one model), forwarded unchanged,
and streamed back chunk by chunk as it arrives; the chunks are watched on the way through for the
token timings that go into the per-arm `heapr_ab_*` histograms on `/metrics`.

Its numbers decide whether a pruned model ships, so they must be fair: each arm has its own
connection pool, sized so that no admitted request waits for one, and latency is timed from the
moment a request is written to the arm, so whatever a request waited inside the proxy (reported on
its own, heapr_ab_queue_wait_seconds) is never charged to an arm.

Robustness is part of the job, because it sits in front of production: bodies are checked before
they reach an arm (request_check.py) and clients are bounded in time (http_server.py); a request is
failed over to the other arm only when it provably never reached the first (no byte of it written;
not on a 503, which a gateway in front of an arm may send after forwarding), so nothing is generated twice; otherwise the client gets a clear 502/504 in
OpenAI's error format, or an SSE error event if the stream already started; a stream that keeps
producing is never cut, a stalled one is; a client that disconnects cancels the upstream request
(the connection to vLLM is closed, which aborts the generation). Prompts and outputs are never
logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import anyio
import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from heapr_serve.ab.arm import Arm
from heapr_serve.ab.exchange import Exchange
from heapr_serve.ab.metrics import ABMetrics
from heapr_serve.ab.ramp import Ramp, RampChecks
from heapr_serve.ab.request_check import BadRequest, parse_request
from heapr_serve.ab.shadow import Shadow
from heapr_serve.ab.wire import ARM_HEADER, GENERATION_PATHS, HOP_BY_HOP, MAX_HEAD_BYTES, PROXY_KEY_HEADER, _describe, _error


MODEL_REFRESH_POLLS = 5  # health polls between re-reads of an arm's model label


@dataclass
class ProxyConfig:
    a_url: str
    b_url: str
    share_b: float = 0.1
    sticky_header: Optional[str] = None
    model_a: Optional[str] = None
    model_b: Optional[str] = None
    proxy_key: Optional[str] = None
    connect_timeout: float = 5.0
    timeout: float = 300.0  # until an arm's answer starts (its first body byte)
    idle_timeout: float = 60.0  # longest silence of an arm within an answer
    client_timeout: float = 30.0  # for a client to send its request, and to take each chunk
    max_inflight: int = 1024  # generation requests at once; 503 above
    max_connections: Optional[int] = None  # per arm; None: --max-inflight (no arm ever queues)
    max_body_bytes: int = 16 << 20
    failover: bool = True
    health_interval: float = 2.0
    log_requests: bool = False
    seed: Optional[int] = None  # of the random split (tests replay a split with it)
    shadow_rate: float = 0.0  # share of requests both arms also answer greedily, compared (shadow.py)
    shadow_max_inflight: int = 8
    shadow_max_tokens: int = 64
    ramp_steps: Optional[list] = None  # B's share in percent, step by step (ramp.py); replaces share_b
    step_after: int = 200
    ramp_state: Optional[str] = None
    ramp_checks: RampChecks = field(default_factory=RampChecks)

    def pool_size(self) -> int:
        """Connections per arm: enough for every admitted request unless set lower, so one arm's
        traffic never waits for a connection, whatever the share (each arm has its own pool)."""
        return self.max_connections or self.max_inflight


@dataclass
class Upstream(Arm):
    """One upstream deployment: its URL, its bounded client, and what the proxy knows of it."""

    rewrite_model: Optional[str] = None
    client: Optional[httpx.AsyncClient] = None
    model: str = "unknown"
    up: bool = True
    last_error: str = ""
    known: set = field(default_factory=set)


class ABProxy:
    """The proxy: a Starlette app plus the per-arm state and metrics it shares across requests."""

    def __init__(self, cfg: ProxyConfig, metrics: ABMetrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or ABMetrics()
        self.arms = {"a": Upstream("a", cfg.a_url.rstrip("/"), rewrite_model=cfg.model_a),
                     "b": Upstream("b", cfg.b_url.rstrip("/"), rewrite_model=cfg.model_b)}
        for arm in self.arms.values():
            if arm.rewrite_model:
                arm.model = arm.rewrite_model
        self.rng = random.Random(cfg.seed)
        self.shadow = Shadow(self, cfg.shadow_rate, cfg.shadow_max_inflight, cfg.shadow_max_tokens, cfg.seed)
        self.ramp = None if not cfg.ramp_steps else Ramp(cfg.ramp_steps, cfg.step_after, cfg.ramp_checks,
                                                         Path(cfg.ramp_state) if cfg.ramp_state else None, self.metrics)
        self.active = 0  # generation requests being handled (the --max-inflight limit)
        self.polls = 0  # health checks so far
        self.starlette = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/ab/status", self.status, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
            lifespan=self._lifespan,
        )

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await self._asgi(scope, receive, send)

        self.app = app  # a plain function, so servers recognise an ASGI 3 app

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app: Starlette behind the --max-inflight limit, which applies to generation
        requests only (so /health and /metrics answer under any load) and counts what it refuses."""
        if scope["type"] == "http" and sum(len(k) + len(v) + 4 for k, v in scope["headers"]) \
                > MAX_HEAD_BYTES:  # (the HTTP layer bounds heads that arrive in pieces)
            self.metrics.rejected.labels("headers_too_large").inc()
            await _error(431, f"request headers over {MAX_HEAD_BYTES} bytes",
                         "invalid_request_error")(scope, receive, send)
            return
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.starlette(scope, receive, send)
            return
        if self.active >= self.cfg.max_inflight:
            self.metrics.rejected.labels("overloaded").inc()
            await _error(503, f"the proxy is handling --max-inflight {self.cfg.max_inflight} "
                         "requests; retry later", "overloaded")(scope, receive, send)
            return
        self.active += 1
        try:
            await self.starlette(scope, receive, send)
        finally:
            self.active -= 1

    # --- lifecycle ---

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        cfg = self.cfg
        # read, write and pool waits are bounded by the request's own deadlines (--timeout until the
        # answer starts, --idle-timeout within it), not by one socket-level number
        timeout = httpx.Timeout(connect=cfg.connect_timeout, read=None, write=None, pool=None)
        limits = httpx.Limits(max_connections=cfg.pool_size(),
                              max_keepalive_connections=cfg.pool_size(), keepalive_expiry=30)
        for arm in self.arms.values():
            arm.client = httpx.AsyncClient(base_url=arm.url, timeout=timeout, limits=limits,
                                           follow_redirects=False, trust_env=False)
        if cfg.shadow_rate:
            self.shadow.open_clients(timeout)
        await self.check_health(report=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._health_loop)
            self.shadow.tasks = tg
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        for arm in self.arms.values():
            await arm.client.aclose()
        await self.shadow.close_clients()

    async def _health_loop(self) -> None:
        while True:
            await anyio.sleep(self.cfg.health_interval)
            await self.check_health(report=False)

    async def check_health(self, report: bool) -> None:
        """Poll each arm's /health, and its /v1/models for the model label: while it is unknown, when
        the arm comes back up, and every MODEL_REFRESH_POLLS polls, so that a label learned late (an
        arm down at start) or changed by a redeploy is current, without a second request on every poll."""
        self.polls += 1
        for arm in self.arms.values():
            try:
                r = await arm.client.get("/health", timeout=min(2.0, self.cfg.timeout))
                up, error = r.status_code == 200, "" if r.status_code == 200 else f"/health answered {r.status_code}"
            except httpx.HTTPError as exc:
                up, error = False, _describe(exc)
            refresh = arm.model == "unknown" or not arm.up or self.polls % MODEL_REFRESH_POLLS == 0
            if up and refresh and not arm.rewrite_model:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                    r = await arm.client.get("/v1/models", timeout=min(2.0, self.cfg.timeout))
                    model = str(r.json()["data"][0]["id"])
                    if model != arm.model:
                        if arm.model != "unknown":
                            print(f"ab-proxy: arm {arm.name} ({arm.url}) now serves {model} (was {arm.model}); "
                                  "its metrics carry the new label", file=sys.stderr, flush=True)
                            self.metrics.up.labels(arm.name, arm.model).set(0)
                        arm.model = model
            # the change is said before it is published (no await in between), so whoever sees the
            # new state through /health also finds it in the log
            if (report and not up) or (not report and arm.up != up):
                state = "back up" if up else (
                    f"not reachable ({error}); its traffic fails over to the other arm "
                    "until /health answers" if self.cfg.failover else f"not reachable ({error})")
                print(f"ab-proxy: arm {arm.name} ({arm.url}) {state}", file=sys.stderr, flush=True)
            arm.up, arm.last_error = up, error
            self._label(arm)
            self.metrics.up.labels(arm.name, arm.model).set(1 if arm.up else 0)

    def _label(self, arm: Arm) -> None:
        if arm.model not in arm.known:
            arm.known.add(arm.model)
            self.metrics.init_arm(arm.name, arm.model)

    # --- small endpoints ---

    async def _http_exception(self, _request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, f"{exc.detail}", "invalid_request_error")

    async def health(self, _request: Request) -> Response:
        arms = {a.name: {"url": a.url, "up": a.up, "model": a.model, "error": a.last_error or None}
                for a in self.arms.values()}
        n_up = sum(a.up for a in self.arms.values())
        status = "ok" if n_up == 2 else "degraded" if n_up == 1 else "down"
        return JSONResponse({"status": status, "share_b": self.share_b(), "arms": arms},
                            status_code=200 if n_up else 503)

    def share_b(self) -> float:
        return self.ramp.share() if self.ramp is not None else self.cfg.share_b

    async def status(self, _request: Request) -> Response:
        """The split and, with --ramp, the ramp's state, step and the reason for its last change."""
        ramp = self.ramp.status() if self.ramp is not None else {"state": "off"}
        return JSONResponse({"share_b": self.share_b(), "ramp": ramp, "shadow_rate": self.cfg.shadow_rate})

    async def metrics_endpoint(self, _request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def _authorized(self, request: Request) -> bool:
        key = self.cfg.proxy_key
        if not key:
            return True
        given = request.headers.get(PROXY_KEY_HEADER, "")
        return hmac.compare_digest(given.encode(), key.encode())

    async def models(self, request: Request) -> Response:
        """/v1/models from arm A (B if A is down): clients see the model they asked for."""
        if not self._authorized(request):
            self.metrics.rejected.labels("unauthorized").inc()
            return _error(401, f"missing or wrong {PROXY_KEY_HEADER} header", "authentication_error")
        headers = self._forward_headers(request)
        errors = []
        for arm in sorted(self.arms.values(), key=lambda a: (not a.up, a.name)):
            try:
                r = await arm.client.get("/v1/models", headers=headers,
                                         timeout=min(10.0, self.cfg.timeout))
            except httpx.HTTPError as exc:
                errors.append(f"{arm.name}: {_describe(exc)}")
                continue
            return Response(r.content, status_code=r.status_code,
                            media_type=r.headers.get("content-type"), headers={ARM_HEADER: arm.name})
        return _error(502, "no arm answered /v1/models: " + "; ".join(errors), "upstream_unavailable")

    # --- the proxied generation endpoints ---

    def choose(self, request: Request) -> str:
        """The arm the split assigns: sticky by header hash when configured, else at random."""
        u = None
        if self.cfg.sticky_header:
            value = request.headers.get(self.cfg.sticky_header)
            if value:
                digest = hashlib.sha256(value.encode()).digest()
                u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
        if u is None:
            u = self.rng.random()
        return "b" if u < self.share_b() else "a"

    def model_for(self, arm: Arm, asked) -> str | None:
        """The `model` a request must name for `arm`, or None to send it as it is: --model-a/-b, or
        this arm's model when the client named the other arm's (dense and pruned are usually served
        under different names, and clients know one of them)."""
        target = arm.rewrite_model
        if target is None:
            other = self.arms["b" if arm.name == "a" else "a"]
            if asked is not None and asked == other.model and arm.model not in (asked, "unknown"):
                target = arm.model
        return target if target and asked != target else None

    def _forward_headers(self, request: Request) -> list[tuple[bytes, bytes]]:
        """The client's headers as raw bytes (any byte a client may send passes; repeated headers
        stay repeated), less hop-by-hop ones and the proxy's own."""
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower()
                   not in HOP_BY_HOP]
        headers.append((b"accept-encoding", b"identity"))  # the proxy reads the stream's timings
        return headers

    def _too_large(self) -> Response:
        self.metrics.rejected.labels("too_large").inc()
        return _error(413, f"request body over {self.cfg.max_body_bytes} bytes "
                      "(raise ab-proxy --max-body-mb)", "invalid_request_error")

    async def _read_body(self, request: Request) -> bytes | Response:
        """The body, or the error response: 413 over --max-body-mb (told by Content-Length before
        reading, or counted while reading), 408 when it takes longer than --client-timeout."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            return self._too_large()
        body = bytearray()
        with anyio.move_on_after(self.cfg.client_timeout) as scope:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.cfg.max_body_bytes:
                    return self._too_large()
        if scope.cancelled_caught:
            self.metrics.rejected.labels("slow_client").inc()
            return _error(408, f"request body not received within --client-timeout "
                          f"{self.cfg.client_timeout:g}s", "invalid_request_error")
        return bytes(body)

    async def completions(self, request: Request) -> Response:
        if not self._authorized(request):
            self.metrics.rejected.labels("unauthorized").inc()
            return _error(401, f"missing or wrong {PROXY_KEY_HEADER} header", "authentication_error")
        try:
            body = await self._read_body(request)
        except ClientDisconnect:  # the client left while sending: nobody to answer
            self.metrics.rejected.labels("client_gone").inc()
            return Response(status_code=400)
        if isinstance(body, Response):
            return body
        received = time.perf_counter()
        try:
            payload = parse_request(body, chat=request.url.path.endswith("/chat/completions"))
        except BadRequest as exc:
            self.metrics.rejected.labels("malformed").inc()
            return _error(400, str(exc), "invalid_request_error")
        arm = self.choose(request)
        models = {name: a.model for name, a in self.arms.items()}
        self.metrics.assigned.labels(arm, models[arm]).inc()
        self.shadow.maybe_probe(request.url.path, payload, self._forward_headers(request), arm)
        return Exchange(self, request.url.path, payload, body, self._forward_headers(request),
                         arm, models, received)
