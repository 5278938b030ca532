"""A tiny OpenAI-compatible streaming server, used as the *upstream* in the A/B tests.

It is a test helper, not part of what users run: the proxy and the benchmark under test talk to it
over real HTTP exactly as they talk to vLLM, but it answers in milliseconds and needs no model, so
load and failover tests can use hundreds of requests on a small machine. Its timing is set on the
command line (time to first token, delay between tokens), so a test knows which arm is faster and
by how much. `/stats` tells a test how many requests it started, finished, and saw the client drop;
`/metrics` reports, under vLLM's own metric names, the latency it served itself (from the moment its
handler got the request), so a test can set what the proxy or the benchmark measured against what
the arm saw, as one would with vLLM.

Run it as a script (no package import, so it starts in well under a second):

    python tests/helpers/openai_stub.py --port 9001 --model stub-a --ttft 0.02 --token-delay 0.005
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


# --slow-after's slow-down: large enough that the stub's own delay, not the proxy's and client's time on a
# slow 2-core machine (~30 ms a request on an AVX2 EPYC), decides a latency check with ratio 3
SLOW_FACTOR = 50.0


def build_app(model: str, ttft: float, token_delay: float, fail_status: int = 0,
              models_off: bool = False, diverge_after: int = -1, slow_after: int = -1) -> Starlette:
    """Starlette app serving /v1/completions, /v1/chat/completions, /v1/models, /health, /stats,
    /metrics. With `models_off`, /v1/models answers 503 until a POST to /admin/models-on (a test
    then knows exactly when a proxy can learn this arm's model name). With `slow_after` N, from its
    N-th completion on it is SLOW_FACTOR times slower (a server that slows down mid-run)."""
    # what the last request carried, so a test can check what a proxy forwarded
    stats = {"started": 0, "finished": 0, "disconnected": 0, "last_model": None,
             "last_authorization": None, "last_headers": []}
    listing = {"on": not models_off}
    reg = CollectorRegistry()
    buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
    ttft_h = Histogram("vllm:time_to_first_token_seconds", "TTFT as this server saw it",
                       ["model_name"], buckets=buckets, registry=reg).labels(model)
    e2e_h = Histogram("vllm:e2e_request_latency_seconds", "E2E as this server saw it",
                      ["model_name"], buckets=buckets, registry=reg).labels(model)
    gen_c = Counter("vllm:generation_tokens", "tokens generated", ["model_name"],
                    registry=reg).labels(model)
    prompt_c = Counter("vllm:prompt_tokens", "prompt tokens", ["model_name"],
                       registry=reg).labels(model)
    ok_c = Counter("vllm:request_success", "requests finished", ["model_name"],
                   registry=reg).labels(model)

    def served(arrival: float, n_prompt: int, n_out: int) -> None:
        e2e_h.observe(time.perf_counter() - arrival)
        gen_c.inc(n_out)
        prompt_c.inc(n_prompt)
        ok_c.inc()

    async def completions(request: Request) -> Response:
        arrival = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": {"message": "body is not JSON", "type": "BadRequestError",
                                           "code": 400}}, status_code=400)
        if fail_status:
            return JSONResponse({"error": {"message": "stub told to fail", "code": fail_status}},
                                status_code=fail_status)
        stats["last_model"] = body.get("model") if isinstance(body, dict) else None
        stats["last_authorization"] = request.headers.get("authorization")
        stats["last_headers"] = sorted(request.headers.keys())
        chat = request.url.path.endswith("/chat/completions")
        if chat:
            prompt = " ".join(str(m.get("content", "")) for m in body.get("messages") or [])
        else:
            prompt = body.get("prompt") or ""
            if isinstance(prompt, list):
                prompt = " ".join(map(str, prompt))
        n_prompt = max(1, len(str(prompt).split()))
        n_out = int(body.get("max_tokens") or 16)
        slow = SLOW_FACTOR if 0 <= slow_after <= stats["started"] else 1.0
        t_first, t_token = ttft * slow, token_delay * slow
        stream = bool(body.get("stream"))
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
        rid = f"cmpl-{stats['started']}"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                 "total_tokens": n_prompt + n_out}

        def choice(text: str, finish: str | None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def sse():
            stats["started"] += 1
            try:
                if chat:
                    first = {"id": rid, "object": obj, "created": created, "model": model,
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}
                    yield f"data: {json.dumps(first)}\n\n"
                await asyncio.sleep(t_first)
                for i in range(n_out):
                    if i:
                        await asyncio.sleep(t_token)
                    finish = "length" if i == n_out - 1 else None
                    ev = {"id": rid, "object": obj, "created": created, "model": model,
                          "choices": [choice(f" tok{i}", finish)]}
                    if i == 0:
                        ttft_h.observe(time.perf_counter() - arrival)
                    yield f"data: {json.dumps(ev)}\n\n"
                if usage_in_stream:
                    ev = {"id": rid, "object": obj, "created": created, "model": model,
                          "choices": [], "usage": usage}
                    yield f"data: {json.dumps(ev)}\n\n"
                yield "data: [DONE]\n\n"
                stats["finished"] += 1
                served(arrival, n_prompt, n_out)
            except asyncio.CancelledError:
                stats["disconnected"] += 1
                raise

        async def whole() -> Response:
            # like vLLM: headers and body together at the end; a client that hangs up meanwhile
            # is noticed (vLLM then aborts the request)
            stats["started"] += 1
            end = time.monotonic() + t_first + t_token * max(0, n_out - 1)
            while time.monotonic() < end:
                await asyncio.sleep(min(0.02, max(0.0, end - time.monotonic())))
                if await request.is_disconnected():
                    stats["disconnected"] += 1
                    return Response(status_code=499)
            # its greedy answer: tok0 tok1 ..., or from --diverge-after N on alt{N} alt{N+1} ...; each
            # token at log-prob -0.1, the other spelling in its top 5 at -1.5
            tokens = [f" {'alt' if 0 <= diverge_after <= i else 'tok'}{i}" for i in range(n_out)]
            text = "".join(tokens)
            msg = ({"index": 0, "message": {"role": "assistant", "content": text},
                    "finish_reason": "length"} if chat else
                   {"index": 0, "text": text, "finish_reason": "length"})

            def other(t: str) -> str:
                return t.replace("tok", "alt") if "tok" in t else t.replace("alt", "tok")

            if body.get("logprobs"):
                if chat:
                    msg["logprobs"] = {"content": [{"token": t, "logprob": -0.1, "top_logprobs": [
                        {"token": t, "logprob": -0.1}, {"token": other(t), "logprob": -1.5}]} for t in tokens]}
                else:
                    msg["logprobs"] = {"tokens": tokens, "token_logprobs": [-0.1] * n_out,
                                       "top_logprobs": [{t: -0.1, other(t): -1.5} for t in tokens]}
            stats["finished"] += 1
            served(arrival, n_prompt, n_out)
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": model, "choices": [msg],
                                 "usage": usage})

        if stream:
            return StreamingResponse(sse(), media_type="text/event-stream")
        return await whole()

    async def models(_: Request) -> Response:
        if not listing["on"]:
            return Response(status_code=503)
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model",
                                                         "owned_by": "stub"}]})

    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def stat(_: Request) -> Response:
        return JSONResponse(stats)

    async def models_on(_: Request) -> Response:
        listing["on"] = True
        return Response(status_code=204)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(reg), media_type="text/plain; version=0.0.4")

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
        Route("/stats", stat),
        Route("/metrics", metrics),
        Route("/admin/models-on", models_on, methods=["POST"]),
    ])


# --- launching processes from tests: the stub, and the real `heapr-serve` commands under test ---


def free_port() -> int:
    """A loopback port that was free a moment ago (here, not imported: the stub must start fast)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Poll `url` until it answers (any status); fail early if `proc` died."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def spawn(args: list[str], log: Path | None = None) -> subprocess.Popen:
    """Start a process in its own group, so stop() ends it and anything it started."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log:
            out.close()


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """End a process started by spawn() (its whole group), waiting for it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def start_stub(port: int, model: str, ttft: float, token_delay: float, fail_status: int = 0,
               log: Path | None = None, models_off: bool = False, diverge_after: int = -1, slow_after: int = -1) -> subprocess.Popen:
    """Run this file as a server on `port` and wait until it answers."""
    proc = spawn([sys.executable, __file__, "--port", str(port), "--model", model, "--ttft", str(ttft),
                  "--token-delay", str(token_delay), "--fail-status", str(fail_status)]
                 + (["--models-off"] if models_off else []) + ["--diverge-after", str(diverge_after), "--slow-after", str(slow_after)], log)
    wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=30)
    return proc


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread of this process (tests of the proxy
    in-process: real sockets and HTTP, without paying a second interpreter start-up)."""

    def __init__(self, app, port: int, config: uvicorn.Config | None = None) -> None:
        import threading

        config = config or uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                          access_log=False, server_header=False,
                                          date_header=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"in-process server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class DroppingServer:
    """An arm that takes a request and dies before answering: /health and /v1/models answer, a
    POST is read to its last byte (and counted in `.received`), then the connection is reset. A
    real TCP server in a thread, for the no-duplicate-generation tests: the proxy must not resend
    such a request to the other arm, which would generate (and bill) it a second time."""

    def __init__(self, port: int) -> None:
        import threading

        self.url = f"http://127.0.0.1:{port}"
        self.received = 0
        self.sock = socket.create_server(("127.0.0.1", port))
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        import struct

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    part = conn.recv(65536)
                    if not part:
                        break
                    data += part
                head, _, body = data.partition(b"\r\n\r\n")
                if head.startswith(b"GET"):
                    text = b'{"data": [{"id": "dropper"}]}' if b"/v1/models" in head else b""
                    conn.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: "
                                 + str(len(text)).encode() + b"\r\n\r\n" + text)
                    continue
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(body) < length:
                    part = conn.recv(65536)
                    if not part:
                        break
                    body += part
                self.received += 1
                # SO_LINGER 0: close with a reset, as a crashed process's connections end
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def __enter__(self) -> "DroppingServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)


def heapr_serve_exe() -> str:
    """The `heapr-serve` console script of the running interpreter's environment."""
    exe = Path(sys.executable).parent / "heapr-serve"
    return str(exe) if exe.exists() else "heapr-serve"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="stub")
    p.add_argument("--ttft", type=float, default=0.01, help="seconds before the first token")
    p.add_argument("--token-delay", type=float, default=0.002, help="seconds between tokens")
    p.add_argument("--fail-status", type=int, default=0, help="answer every completion with this status")
    p.add_argument("--models-off", action="store_true", help="/v1/models answers 503 until a POST "
                   "to /admin/models-on")
    p.add_argument("--diverge-after", type=int, default=-1, help="greedy tokens from this position on differ "
                   "(alt{i} for tok{i}): a model that answers otherwise, for shadow comparisons")
    p.add_argument("--slow-after", type=int, default=-1, help=f"from this completion on, {SLOW_FACTOR:g} times slower")
    args = p.parse_args()
    app = build_app(args.model, args.ttft, args.token_delay, args.fail_status, args.models_off, args.diverge_after,
                    args.slow_after)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
