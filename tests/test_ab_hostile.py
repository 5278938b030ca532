"""`heapr-serve ab-proxy` against hostile clients, over real sockets.

Every malformed, binary, empty, pathologically nested, wrongly typed or oversized body, huge or
repeated headers, clients that send slowly or stop reading, and clients that vanish mid-request get
a 4xx or a clean close: never a 5xx, never a crash, never anything sent to an arm, and never an
effect on the well-behaved requests around them. One stub serves as both arms; the proxy runs
in this process under the server configuration of the command, with --client-timeout 1 s. All of it
twice: without shadow comparisons and with every request shadowed (`--shadow-rate 1`), where a good
request also brings its two probes to the arms, and a bad one still brings nothing.
"""

from __future__ import annotations

import gc
import socket
import struct
import time

import httpx
import pytest

from heapr_serve.ab.http_server import server_config
from heapr_serve.ab.metrics import read_counter_sum
from heapr_serve.ab.exchange import Exchange
from heapr_serve.ab.proxy import ABProxy, ProxyConfig
from tests.helpers.openai_stub import ServerThread, free_port, start_stub, stop

MAX_BODY = 10_000


@pytest.fixture(scope="module", params=[0.0, 1.0], ids=["no shadow", "all shadowed"])
def env(request):
    port = free_port()
    stub = start_stub(port, "stub", ttft=0.0, token_delay=0.01)
    upstream = f"http://127.0.0.1:{port}"
    cfg = ProxyConfig(a_url=upstream, b_url=upstream, share_b=0.5, max_body_bytes=MAX_BODY,
                      client_timeout=1.0, shadow_rate=request.param)
    ab = ABProxy(cfg)
    pport = free_port()
    srv = ServerThread(ab.app, pport, server_config(ab.app, "127.0.0.1", pport, cfg.client_timeout))
    try:
        with srv:
            yield {"url": srv.url, "port": pport, "upstream": upstream, "server": srv, "proxy": ab,
                   "per_request": 3 if request.param else 1}  # requests an arm sees per good request
    finally:
        stop(stub)


def _started(env) -> int:
    """Requests the arm has started, once no shadow probe is still on its way."""
    deadline = time.monotonic() + 10
    while env["proxy"].shadow.inflight:
        assert time.monotonic() < deadline, "shadow probes still in flight"
        time.sleep(0.05)
    return httpx.get(env["upstream"] + "/stats", timeout=5).json()["started"]


def _ok(env) -> None:
    """A well-behaved request still gets its answer."""
    r = httpx.post(env["url"] + "/v1/completions", json={"prompt": "p", "max_tokens": 2}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " tok0 tok1"


def _raw(env, data: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes, return everything the proxy answers until it closes (`wait` is a guard)."""
    with socket.create_connection(("127.0.0.1", env["port"]), timeout=wait) as s:
        s.sendall(data)
        out = b""
        while True:
            part = s.recv(65536)
            if not part:
                return out
            out += part


NESTED = b'{"prompt": "x", "extra": ' + b"[" * 200 + b"]" * 200 + b"}"
BODIES = [  # (path, body, status, words in the error)
    ("/v1/completions", b"", 400, "empty"),
    ("/v1/completions", b"   \n", 400, "empty"),
    ("/v1/completions", b'{"prompt": ', 400, "not valid JSON"),
    ("/v1/completions", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd", 400, "not valid JSON"),
    ("/v1/completions", b"\xc3\x28\xa0\xa1\x00\x01", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object, got an array"),
    ("/v1/completions", b'"just a string"', 400, "JSON object, got a string"),
    ("/v1/completions", NESTED, 400, "nests deeper than 64"),
    ("/v1/completions", b"[" * 9_000, 400, "nests deeper than 64"),
    ("/v1/completions", b'{"a":' * 1500 + b"1" + b"}" * 1500, 400, "nests deeper than 64"),
    ("/v1/completions", b'{"prompt": 5}', 400, "`prompt` must be"),
    ("/v1/completions", b'{"prompt": []}', 400, "`prompt` must be"),
    ("/v1/completions", b'{"prompt": [1, "a"]}', 400, "`prompt` must be"),
    ("/v1/completions", b'{"max_tokens": 3}', 400, "`prompt` must be"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "`stream` must be a boolean"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "10"}', 400, "`max_tokens` must be"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400, "`max_tokens` must be"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}', 400, "`max_tokens` must be"),
    ("/v1/completions", b'{"prompt": "x", "model": ["a"]}', 400, "`model` must be a string"),
    ("/v1/completions", b'{"prompt": "x", "stream_options": 1}', 400, "`stream_options` must"),
    ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}', 400, "`temperature` must"),
    ("/v1/chat/completions", b'{"messages": "hi"}', 400, "`messages` must be"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "`messages` must be"),
    ("/v1/chat/completions", b'{"messages": [1, 2]}', 400, "`messages` must be"),
    ("/v1/chat/completions", b'{"prompt": "no messages"}', 400, "`messages` must be"),
    ("/v1/completions", b'{"prompt": "' + b"x" * (MAX_BODY + 1) + b'"}', 413, "--max-body-mb"),
]


def test_bad_bodies_get_a_4xx_and_reach_no_arm(env):
    started = _started(env)
    with httpx.Client(timeout=10) as c:
        for path, body, status, words in BODIES:
            r = c.post(env["url"] + path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (body[:60], r.status_code, r.text[:200])
            msg = r.json()["error"]["message"]
            assert words in msg and "\n" not in msg, (body[:60], msg)
    assert _started(env) == started  # none reached the arm
    text = httpx.get(env["url"] + "/metrics", timeout=5).text
    n_413 = sum(1 for b in BODIES if b[2] == 413)
    assert read_counter_sum(text, "heapr_ab_rejected_total", reason="malformed") >= len(BODIES) - n_413
    # odd but valid bodies pass: a lone surrogate escape, unknown fields, token-id prompts
    for body in (b'{"prompt": "\\ud800 x", "max_tokens": 1}', b'{"prompt": [1, 2, 3], "max_tokens": 1}',
                 b'{"prompt": [[1, 2], [3]], "max_tokens": 1, "whatever": {"a": [1]}}'):
        r = httpx.post(env["url"] + "/v1/completions", content=body, timeout=10)
        assert r.status_code == 200, (body, r.text)
    _ok(env)


def test_huge_repeated_and_odd_headers(env):
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
    body = b'{"prompt": "p", "max_tokens": 1}'
    cl = b"content-length: %d\r\n" % len(body)
    # headers over 16 KiB: a 431 when they come at once, a 400 and a close when they dribble in
    out = _raw(env, head + b"x-big: " + b"a" * 20_000 + b"\r\n" + cl + b"\r\n" + body)
    assert out.startswith(b"HTTP/1.1 431") and b"over 16384 bytes" in out, out[:300]
    with socket.create_connection(("127.0.0.1", env["port"]), timeout=10) as s:
        out = b""
        try:
            s.sendall(head + b"x-big: ")
            for _ in range(40):
                s.sendall(b"a" * 1000)
                time.sleep(0.01)
        except OSError:  # the proxy closed on us mid-head, as it should
            pass
        try:
            out = s.recv(65536)
        except ConnectionResetError:  # (the 400 can be lost to the reset of the unread rest)
            out = b"reset"
    assert out.startswith(b"HTTP/1.1 400") or out == b"reset", out[:100]
    # conflicting Content-Length headers: 400
    out = _raw(env, head + cl + b"content-length: 5\r\n\r\n" + body)
    assert out.startswith(b"HTTP/1.1 400"), out[:100]
    # a malformed request line and a header without a colon: 400
    assert _raw(env, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw(env, head + b"no colon here\r\n" + cl + b"\r\n" + body).startswith(b"HTTP/1.1 400")
    # 300 repeated headers and bytes outside ASCII in a value: passed to the arm as they came
    many = b"".join(b"x-repeat: %d\r\n" % i for i in range(300))
    out = _raw(env, head + many + b"x-name: caf\xe9\r\n" + cl + b"\r\n" + body)
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    seen = httpx.get(env["upstream"] + "/stats", timeout=5).json()["last_headers"]
    assert "x-repeat" in seen and "x-name" in seen
    # a declared body far over the limit: 413 at once, without waiting for the body
    out = _raw(env, head + b"content-length: 1000000000000\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413"), out[:100]
    _ok(env)


def test_slow_and_vanishing_clients_do_not_hold_the_proxy(env):
    """Connections that dribble a head or a body, or stop reading, are ended after
    --client-timeout; clients that vanish mid-body or mid-stream cost nothing; meanwhile
    well-behaved requests are answered."""
    port = env["port"]
    started = _started(env)
    disconnected = httpx.get(env["upstream"] + "/stats", timeout=5).json()["disconnected"]
    slow_head = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow_head.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")  # and never the rest
    slow_body = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n"
                      b'{"prompt"')
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)  # sends nothing at all
    vanish = socket.create_connection(("127.0.0.1", port), timeout=10)
    vanish.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
    vanish.close()
    # a stream whose client resets the connection after the first bytes
    rst = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = b'{"prompt": "p", "max_tokens": 2000, "stream": true}'
    rst.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body))
    assert rst.recv(4096).startswith(b"HTTP/1.1 200")
    rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rst.close()
    _ok(env)  # while all of the above hold their connections
    try:
        assert slow_head.recv(65536) == b""  # closed without an answer (the guard is 10 s)
        assert idle.recv(65536) == b""
        answer = slow_body.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and b"--client-timeout" in answer, answer[:200]
    finally:
        for s in (slow_head, slow_body, idle):
            s.close()
    deadline = time.monotonic() + 10
    while httpx.get(env["upstream"] + "/stats", timeout=5).json()["disconnected"] == disconnected:
        assert time.monotonic() < deadline, "the reset stream was not cancelled upstream"
        time.sleep(0.05)
    text = httpx.get(env["url"] + "/metrics", timeout=5).text
    assert read_counter_sum(text, "heapr_ab_rejected_total", reason="slow_client") >= 1
    assert read_counter_sum(text, "heapr_ab_rejected_total", reason="client_gone") >= 1
    # the reset stream and the one good request (each with its two probes when shadowed), nothing else
    assert _started(env) == started + 2 * env["per_request"]
    _ok(env)


def test_nothing_is_left_behind(env):
    """After all the above: the proxy thread runs, nothing is in flight, and no request's state
    survives (a leak per request would show up here as live exchange objects)."""
    _ok(env)
    deadline = time.monotonic() + 5
    while read_counter_sum(httpx.get(env["url"] + "/metrics", timeout=5).text,
                           "heapr_ab_in_flight") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)  # the last exchange records itself just after its final byte went out
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Exchange]
    assert env["proxy"].shadow.inflight == 0
    if env["per_request"] > 1:  # shadowed: every good request was compared, none failed
        text = httpx.get(env["url"] + "/metrics", timeout=5).text
        assert read_counter_sum(text, "heapr_ab_shadow_total", result="match") >= 5
        assert read_counter_sum(text, "heapr_ab_shadow_total", result="failed") == 0
    assert env["server"].thread.is_alive()
