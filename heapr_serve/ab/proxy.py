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
failed over to the other arm only when it provably never reached the first (no byte of it written,
or a 503 refusal), so nothing is generated twice; otherwise the client gets a clear 502/504 in
OpenAI's error format, or an SSE error event if the stream already started; a stream that keeps
producing is never cut, a stalled one is; a client that disconnects cancels the upstream request
(the connection to vLLM is closed, which aborts the generation). Prompts and outputs are never
logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

import anyio
import httpx
import typer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from heapr_serve.ab.arm import Arm
from heapr_serve.ab.metrics import ABMetrics, StreamTimer
from heapr_serve.ab.request_check import BadRequest, parse_request
from heapr_serve.errors import HeaprError

PROXY_KEY_HEADER = "x-heapr-proxy-key"
ARM_HEADER = "x-heapr-arm"  # added to every proxied response: which arm answered
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
              "accept-encoding", PROXY_KEY_HEADER, ARM_HEADER}
# An arm's answer that means it refused the request without processing it (RFC 9110: the server is
# unable to handle it now), so the other arm may take it. Not 502/504: a gateway in front of an arm
# sends those after forwarding the request, which may then be generating.
FAILOVER_STATUSES = {503}
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_HEAD_BYTES = 16 * 1024  # a request's headers; what uvicorn (and so vLLM) takes by default


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


def _error(status: int, message: str, kind: str) -> JSONResponse:
    """An error body in OpenAI's shape, so SDK clients show the message."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def _error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def _describe(exc: BaseException) -> str:
    """Short reason for an upstream failure, e.g. 'ConnectError: connection refused'."""
    text = str(exc).strip() or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:200]


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
        self.active = 0  # generation requests being handled (the --max-inflight limit)
        self.starlette = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
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
        await self.check_health(report=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._health_loop)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        for arm in self.arms.values():
            await arm.client.aclose()

    async def _health_loop(self) -> None:
        while True:
            await anyio.sleep(self.cfg.health_interval)
            await self.check_health(report=False)

    async def check_health(self, report: bool) -> None:
        """Poll each arm's /health (and /v1/models once, to learn the model label)."""
        for arm in self.arms.values():
            try:
                r = await arm.client.get("/health", timeout=min(2.0, self.cfg.timeout))
                up, error = r.status_code == 200, "" if r.status_code == 200 else f"/health answered {r.status_code}"
            except httpx.HTTPError as exc:
                up, error = False, _describe(exc)
            if up and arm.model == "unknown":
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                    r = await arm.client.get("/v1/models", timeout=min(2.0, self.cfg.timeout))
                    arm.model = str(r.json()["data"][0]["id"])
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
        return JSONResponse({"status": status, "share_b": self.cfg.share_b, "arms": arms},
                            status_code=200 if n_up else 503)

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
        return "b" if u < self.cfg.share_b else "a"

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
        return _Exchange(self, request.url.path, payload, body, self._forward_headers(request),
                         arm, models, received)


class _Attempt(Exception):
    """One arm could not answer: `retry` when the request provably never reached it (nothing of it
    was written to the arm), so the other arm may take it without generating it twice."""

    def __init__(self, kind: str, message: str, retry: bool, status: int = 502) -> None:
        super().__init__(message)
        self.kind, self.message, self.retry, self.status = kind, message, retry, status


class _Exchange(Response):
    """One proxied generation request, run as its own ASGI response.

    Doing the whole upstream exchange inside the response (not in the endpoint) lets a watcher on
    `receive` see a client disconnect at any moment, also while waiting for the first byte, and
    cancel the upstream request.

    Timing: TTFT and end-to-end latency start when the request is written to the arm (httpcore's
    `send_request_headers` trace event) and end with the arm's last byte, so what a request waited
    inside the proxy (for a pooled connection, to connect) is not charged to the arm; it goes to
    heapr_ab_queue_wait_seconds instead.
    """

    def __init__(self, proxy: ABProxy, path: str, payload: dict, raw: bytes,
                 headers: list[tuple[bytes, bytes]], arm: str, models: dict[str, str],
                 received: float) -> None:
        self.proxy, self.path, self.payload, self.raw = proxy, path, payload, raw
        self.headers_out, self.assigned = headers, arm
        self.models = models  # model label of each arm, fixed at assignment for every counter
        self.received = received
        self.served = arm
        self.outcome = "unavailable"
        self.started = False  # response start sent to the client
        self.client_gone = False
        self.finished = False  # the last body message is being sent: a disconnect now is normal
        self.timer: StreamTimer | None = None
        self.sent_at: float | None = None  # when the request was written to the serving arm
        self.ended: float | None = None  # when the arm's last byte arrived
        self.status = 0
        self.sse = False
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            if not self.finished:
                                self.client_gone = True
                                tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch)
                try:
                    await self._run(send)
                finally:
                    tg.cancel_scope.cancel()
        finally:  # counted exactly once, whatever happened
            self._record()

    def _record(self) -> None:
        m = self.proxy.metrics
        if self.client_gone:
            self.outcome = "client_cancelled"
        model = self.models[self.served]
        m.requests.labels(self.served, model, self.outcome).inc()
        e2e = None
        if self.sent_at is not None and self.ended is not None:
            e2e = self.ended - self.sent_at
        if self.outcome == "ok" and self.timer is not None and e2e is not None:
            m.observe(self.served, model, self.timer, e2e)
        if self.proxy.cfg.log_requests:
            ms = "-" if e2e is None else f"{e2e * 1000:.0f}"
            wait = "-" if self.sent_at is None else f"{(self.sent_at - self.received) * 1000:.0f}"
            print(f"ab-proxy: {self.path} arm={self.served} assigned={self.assigned} "
                  f"status={self.status} outcome={self.outcome} ms={ms} queue_ms={wait}",
                  file=sys.stderr, flush=True)

    def _body_for(self, arm: Arm) -> bytes:
        """The request body for `arm`: its `model` rewritten when --model-a/-b says so, or when
        the client named the other arm's model (dense and pruned are usually served under
        different names, and clients know one of them)."""
        asked = self.payload.get("model")
        target = arm.rewrite_model
        if target is None:
            other = self.proxy.arms["b" if arm.name == "a" else "a"]
            if asked is not None and asked == other.model and arm.model not in (asked, "unknown"):
                target = arm.model
        if target and asked != target:
            return json.dumps({**self.payload, "model": target}).encode()
        return self.raw

    async def _run(self, send: Send) -> None:
        proxy, cfg = self.proxy, self.proxy.cfg
        first, other = proxy.arms[self.assigned], proxy.arms["b" if self.assigned == "a" else "a"]
        order = [first]
        if cfg.failover:
            order = [other, first] if (not first.up and other.up) else [first, other]
        failures: list[str] = []
        last_failure: _Attempt | None = None
        for i, arm in enumerate(order):
            if i or arm is not first:
                reason = "down" if last_failure is None else last_failure.kind
                prev = order[i - 1].name if i else first.name
                proxy.metrics.failovers.labels(prev, arm.name, reason).inc()
            self.served = arm.name
            try:
                await self._attempt(arm, send, last=i == len(order) - 1)
                return
            except _Attempt as failure:
                failures.append(failure.message)
                last_failure = failure
                if not failure.retry:
                    break
        assert last_failure is not None
        with contextlib.suppress(_ClientStalled):
            await self._answer_error(send, last_failure, failures)

    async def _answer_error(self, send: Send, last_failure: _Attempt, failures: list[str]) -> None:
        code = last_failure.status
        self.outcome = "timeout" if code == 504 else "unavailable"
        if code == 502 and last_failure.retry:
            self.served = self.assigned  # no arm was reached: counted where the split sent it
        kind = "upstream_timeout" if code == 504 else "upstream_unavailable"
        lead = "no arm could answer: " if last_failure.retry else ""
        msg = lead + "; ".join(failures)
        self.status = code
        body = _error_body(code, msg, kind)
        await self._to_client(send, {"type": "http.response.start", "status": code, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (ARM_HEADER.encode(), self.served.encode())]})
        self.finished = True
        await self._to_client(send, {"type": "http.response.body", "body": body,
                                     "more_body": False})

    async def _attempt(self, arm: Upstream, send: Send, last: bool) -> None:
        """Send the request to `arm` and stream its answer; _Attempt if it could not answer."""
        cfg, name = self.proxy.cfg, arm.name
        marks: dict[str, float] = {}

        async def trace(event: str, _info: dict) -> None:
            if event.endswith("send_request_headers.started") and "sent" not in marks:
                marks["sent"] = time.perf_counter()

        req = arm.client.build_request("POST", self.path, content=self._body_for(arm),
                                       headers=self.headers_out, extensions={"trace": trace})
        model = self.models[name]
        in_flight = self.proxy.metrics.in_flight.labels(name, model)
        in_flight.inc()
        resp = None
        head_deadline = self.received + cfg.timeout
        try:
            try:
                with anyio.fail_after(max(0.0, head_deadline - time.perf_counter())):
                    resp = await arm.client.send(req, stream=True)
            except TimeoutError:
                if "sent" not in marks:
                    raise _Attempt("pool", f"timeout: arm {name} had no free connection within "
                                   f"--timeout {cfg.timeout:g}s (raise --max-connections)",
                                   retry=False, status=504) from None
                raise _Attempt("timeout", f"timeout: arm {name} gave no answer within --timeout "
                               f"{cfg.timeout:g}s", retry=False, status=504) from None
            except httpx.HTTPError as exc:
                never_sent = "sent" not in marks
                if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                    arm.up, arm.last_error = False, _describe(exc)
                if never_sent:
                    raise _Attempt(_reason(exc), f"{_reason(exc)}: arm {name} {_describe(exc)}",
                                   retry=True) from None
                raise _Attempt("disconnect", f"arm {name} failed after receiving the request "
                               f"({_describe(exc)}); not sent to the other arm, which could "
                               "generate it a second time", retry=False) from None
            finally:
                if "sent" in marks:
                    self.sent_at = marks["sent"]
                    self.proxy.metrics.queue_wait.labels(name, model).observe(
                        marks["sent"] - self.received)
            if resp.status_code in FAILOVER_STATUSES and not last:
                raise _Attempt(f"http_{resp.status_code}", f"http_{resp.status_code}: arm {name} "
                               f"answered {resp.status_code}", retry=True)
            await self._stream(resp, arm, send, head_deadline)
        finally:
            in_flight.dec()
            if resp is not None:
                with anyio.CancelScope(shield=True):
                    await resp.aclose()

    async def _to_client(self, send: Send, message: dict) -> None:
        """Send to the client, giving up after --client-timeout (a client that stopped reading
        would otherwise hold the arm's connection and its generation for ever)."""
        with anyio.move_on_after(self.proxy.cfg.client_timeout) as scope:
            await send(message)
        if scope.cancelled_caught:
            self.client_gone = True
            raise _ClientStalled

    async def _stream(self, resp: httpx.Response, arm: Upstream, send: Send,
                      head_deadline: float) -> None:
        """Pass the upstream response through chunk by chunk, timing tokens on the way.

        The first chunk must come by the --timeout deadline, every later one within --idle-timeout
        of the one before: a stream that keeps producing is never cut, a stalled one is."""
        cfg = self.proxy.cfg
        self.status = resp.status_code
        sse = self.sse = resp.headers.get("content-type", "").startswith("text/event-stream")
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()
                   if k.lower() not in HOP_BY_HOP or (k.lower() == "content-length" and not sse)]
        headers.append((ARM_HEADER.encode(), arm.name.encode()))
        try:
            await self._to_client(send, {"type": "http.response.start",
                                         "status": resp.status_code, "headers": headers})
            self.started = True
            timer = StreamTimer(start=self.sent_at if self.sent_at is not None
                                else time.perf_counter())
            chunks = resp.aiter_raw()
            first = True
            while True:
                limit = max(0.0, head_deadline - time.perf_counter()) if first else cfg.idle_timeout
                chunk = None
                with anyio.move_on_after(limit) as wait:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        pass
                if wait.cancelled_caught:
                    self.outcome = "timeout"
                    what = (f"sent nothing within --timeout {cfg.timeout:g}s" if first else
                            f"stalled for --idle-timeout {cfg.idle_timeout:g}s")
                    await self._abort_stream(send, 504, f"arm {arm.name} {what}", sse)
                    return
                if chunk is None:
                    break
                first = False
                if sse:
                    timer.feed_sse(chunk)
                else:
                    timer.feed_body(chunk)
                await self._to_client(send, {"type": "http.response.body", "body": chunk,
                                             "more_body": True})
            self.ended = time.perf_counter()
            self.finished = True
            await self._to_client(send, {"type": "http.response.body", "body": b"",
                                         "more_body": False})
        except _ClientStalled:
            return
        except httpx.HTTPError as exc:
            self.outcome = "stream_error"
            await self._abort_stream(send, 502, f"arm {arm.name} broke the stream: {_describe(exc)}",
                                     sse)
            return
        if not sse:
            timer.finish_body()
        self.timer = timer
        code = resp.status_code
        self.outcome = ("ok" if code < 400 and timer.error is None else
                        "upstream_4xx" if 400 <= code < 500 else "upstream_5xx" if code >= 500
                        else "stream_error")

    async def _abort_stream(self, send: Send, code: int, message: str, sse: bool = True) -> None:
        """End a response that already started: an SSE error event, or a cut connection."""
        self.status = code
        if sse:
            event = b"data: " + _error_body(code, message, "upstream_error") + b"\n\n"
            # shielded (with a bound): a disconnect may cancel us while the error event is being
            # written, and a half-written ending would hide the error from the client
            with anyio.move_on_after(min(5.0, self.proxy.cfg.client_timeout), shield=True):
                await send({"type": "http.response.body", "body": event, "more_body": True})
                self.finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        # not SSE: return without completing the body; the server closes the connection, so the
        # client sees a truncated response instead of a well-formed wrong one.


class _ClientStalled(Exception):
    """The client did not take a response message within --client-timeout."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "connect"
    if isinstance(exc, httpx.PoolTimeout):
        return "pool"
    return "disconnect"


# --- command line ---


def _check_url(flag: str, url: str) -> str:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  (ValueError for a port that is not a number in 0..65535)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise HeaprError(f"{flag} {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000")
    return url


def validate_config(cfg: ProxyConfig) -> None:
    """Reject bad flag values with one line naming the flag and the fix."""
    _check_url("--a", cfg.a_url)
    _check_url("--b", cfg.b_url)
    if not 0.0 <= cfg.share_b <= 1.0:
        raise HeaprError(f"--share-b must be between 0 and 1 (the fraction sent to B), got {cfg.share_b}")
    for flag, value in (("--connect-timeout", cfg.connect_timeout), ("--timeout", cfg.timeout),
                        ("--idle-timeout", cfg.idle_timeout), ("--client-timeout", cfg.client_timeout),
                        ("--health-interval", cfg.health_interval)):
        if not 0 < value < float("inf"):  # (NaN fails too)
            raise HeaprError(f"{flag} must be a positive number of seconds, got {value}")
    if cfg.max_connections is not None and cfg.max_connections < 1:
        raise HeaprError("--max-connections must be at least 1")
    if cfg.max_inflight < 1:
        raise HeaprError("--max-inflight must be at least 1")
    if cfg.max_body_bytes < 1:
        raise HeaprError("--max-body-mb must be positive")


def ab_proxy_command(
    a: str = typer.Option(..., "--a", help="URL of arm A (the dense baseline), e.g. http://127.0.0.1:8001"),
    b: str = typer.Option(..., "--b", help="URL of arm B (the pruned model), e.g. http://127.0.0.1:8002"),
    share_b: float = typer.Option(0.1, "--share-b", help="Fraction of requests sent to B, 0..1."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    sticky_header: Optional[str] = typer.Option(
        None, "--sticky-header", help="Assign by a hash of this request header (e.g. X-User-Id), "
        "so a user always gets the same arm; requests without it are assigned at random."),
    model_a: Optional[str] = typer.Option(None, "--model-a", help="Rewrite the request's `model` to "
                                          "this when it goes to A (arms serving different names)."),
    model_b: Optional[str] = typer.Option(None, "--model-b", help="Same for B."),
    proxy_key: Optional[str] = typer.Option(
        None, "--proxy-key", envvar="HEAPR_PROXY_KEY", help=f"Require this value in the "
        f"{PROXY_KEY_HEADER} header (Authorization still passes through to the arms)."),
    connect_timeout: float = typer.Option(5.0, "--connect-timeout", help="Seconds to connect to an arm."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds until an arm's answer starts "
                                  "(a stream's first chunk, or a whole non-streaming answer); 504 after."),
    idle_timeout: float = typer.Option(60.0, "--idle-timeout", help="Longest silence of an arm "
                                       "within a stream (a stream that keeps producing is never cut)."),
    client_timeout: float = typer.Option(30.0, "--client-timeout", help="Seconds a client may take "
                                         "to send its request, and to take each response chunk."),
    max_connections: Optional[int] = typer.Option(
        None, "--max-connections", help="Connection pool size per arm (default: --max-inflight, so "
        "neither arm's requests wait for a connection)."),
    max_inflight: int = typer.Option(1024, "--max-inflight", help="Concurrent client requests "
                                     "before the proxy answers 503."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", help="Largest request body accepted."),
    no_failover: bool = typer.Option(False, "--no-failover", help="Answer 502/504 instead of "
                                     "sending a failed request to the other arm."),
    health_interval: float = typer.Option(2.0, "--health-interval", help="Seconds between /health checks."),
    log_requests: bool = typer.Option(False, "--log-requests", help="One line per request (arm, "
                                      "status, latency; never the prompt)."),
) -> None:
    """OpenAI-compatible reverse proxy that splits live traffic between A and B and exports metrics."""
    import uvicorn

    from heapr_serve.ab.http_server import server_config

    if not 0 < max_body_mb < float("inf"):
        raise HeaprError(f"--max-body-mb must be a positive number, got {max_body_mb}")
    cfg = ProxyConfig(a_url=a, b_url=b, share_b=share_b, sticky_header=sticky_header,
                      model_a=model_a, model_b=model_b, proxy_key=proxy_key or None,
                      connect_timeout=connect_timeout, timeout=timeout, idle_timeout=idle_timeout,
                      client_timeout=client_timeout, max_inflight=max_inflight,
                      max_connections=max_connections, max_body_bytes=int(max_body_mb * (1 << 20)),
                      failover=not no_failover, health_interval=health_interval,
                      log_requests=log_requests)
    validate_config(cfg)
    if not 1 <= port <= 65535:
        raise HeaprError(f"--port {port} is out of range; give 1..65535")
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise HeaprError(f"--host {host} --port {port}: cannot listen ({exc.strerror}); "
                             "pick a free port") from None
    proxy = ABProxy(cfg)
    print(f"ab-proxy: listening on http://{host}:{port}  A={cfg.a_url}  B={cfg.b_url}  "
          f"share_b={cfg.share_b:g}" + (f"  sticky={sticky_header}" if sticky_header else ""),
          file=sys.stderr, flush=True)
    config = server_config(proxy.app, host, port, cfg.client_timeout, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
