"""One proxied generation request of ab-proxy, from the arm's first byte to the client's last.

The exchange runs as its own ASGI response (so a client disconnect is seen at any moment and cancels
the upstream request), fails over only when the request provably never reached the first arm, passes
the answer through chunk by chunk while timing its tokens, and counts every request exactly once.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from heapr_serve.ab.arm import Arm
from heapr_serve.ab.metrics import StreamTimer
from heapr_serve.ab.wire import ARM_HEADER, HOP_BY_HOP, _describe, _error_body

if TYPE_CHECKING:
    from heapr_serve.ab.proxy import ABProxy, Upstream


class _Attempt(Exception):
    """One arm could not answer: `retry` when the request provably never reached it (nothing of it
    was written to the arm), so the other arm may take it without generating it twice."""

    def __init__(self, kind: str, message: str, retry: bool, status: int = 502) -> None:
        super().__init__(message)
        self.kind, self.message, self.retry, self.status = kind, message, retry, status


class Exchange(Response):
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
        self.gave_up: float | None = None  # when the proxy stopped waiting for the arm (--timeout, --idle-timeout)
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
        m.requests.labels(self.served, model, self.outcome, self.assigned).inc()
        e2e = None
        if self.sent_at is not None and self.ended is not None:
            e2e = self.ended - self.sent_at
        # latency samples only from requests their own arm was assigned: failover traffic (another
        # arm's share, sent while that one was down) is counted above but never enters a ratio
        own = self.served == self.assigned
        if own and self.outcome == "ok" and self.timer is not None and e2e is not None:
            m.observe(self.served, model, self.timer, e2e)
        elif own and self.outcome == "timeout" and self.sent_at is not None and self.gave_up is not None:
            m.observe_timeout(self.served, model, self.timer, self.gave_up - self.sent_at)
        ramp = self.proxy.ramp
        if ramp is not None and own and self.outcome not in ("client_cancelled", "upstream_4xx"):  # (4xx: the client's)
            ramp.record(self.served, self.outcome == "ok", e2e, None if self.timer is None else self.timer.first_token_s)
        if self.proxy.cfg.log_requests:
            ms = "-" if e2e is None else f"{e2e * 1000:.0f}"
            wait = "-" if self.sent_at is None else f"{(self.sent_at - self.received) * 1000:.0f}"
            print(f"ab-proxy: {self.path} arm={self.served} assigned={self.assigned} "
                  f"status={self.status} outcome={self.outcome} ms={ms} queue_ms={wait}",
                  file=sys.stderr, flush=True)

    def _body_for(self, arm: Arm) -> bytes:
        target = self.proxy.model_for(arm, self.payload.get("model"))
        return self.raw if target is None else json.dumps({**self.payload, "model": target}).encode()

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
                self.gave_up = time.perf_counter()
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
            # any answer, a 503 too, is the client's: a gateway in front of an arm may send a 503 after
            # forwarding the request, so it does not prove the arm never saw it
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
                    self.outcome, self.gave_up, self.timer = "timeout", time.perf_counter(), timer
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
