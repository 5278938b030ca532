"""`heapr-serve ab-proxy` over real HTTP, in front of two stub OpenAI servers.

The stubs (tests/helpers/openai_stub.py) are the upstreams, with known timings: A gives its first
token after 20 ms and then one every 10 ms, B is twice as fast. The proxy runs in this process under
uvicorn on a real socket (the same app the command serves; starting the command costs an interpreter
start-up per configuration, which tests/test_ab_load.py pays once). Everything is observed from
outside, as a client and a Prometheus scraper would.

Over 400 lines: one behaviour per test against the same in-process proxy and stubs, which splitting
the file would start twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
import time

import httpx
import pytest

from heapr_serve import cli
from heapr_serve.ab.http_server import server_config
from heapr_serve.ab.metrics import read_counter_sum
from heapr_serve.ab.proxy import ABProxy, ProxyConfig
from tests.helpers.openai_stub import DroppingServer, ServerThread, free_port, start_stub, stop

KEY = "s3cret-proxy-key"
AUTH = {"x-heapr-proxy-key": KEY}


def proxy(a: str, b: str, **kw) -> ServerThread:
    """The proxy app on a free loopback port, under the server configuration the command uses
    (use as a context manager); `.proxy` is the ABProxy."""
    cfg = ProxyConfig(a_url=a, b_url=b, **kw)
    ab = ABProxy(cfg)
    port = free_port()
    srv = ServerThread(ab.app, port, server_config(ab.app, "127.0.0.1", port, cfg.client_timeout))
    srv.proxy = ab
    return srv


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("abproxy")
    pa, pb = free_port(), free_port()
    sa = start_stub(pa, "dense-stub", ttft=0.02, token_delay=0.01)
    sb = start_stub(pb, "pruned-stub", ttft=0.01, token_delay=0.005)
    srv = proxy(f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}", share_b=0.5,
                sticky_header="X-User", proxy_key=KEY, max_body_bytes=10_000, timeout=20)
    with srv:
        yield {"url": srv.url, "a": f"http://127.0.0.1:{pa}", "b": f"http://127.0.0.1:{pb}",
               "server": srv}
    for p in (sa, sb):
        stop(p)


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=5).text


def test_stream_is_passed_through_chunk_by_chunk(setup):
    """The whole stream arrives intact; and its first token reaches the client while the upstream
    is still generating (the upstream's own /stats says so), so nothing is buffered."""
    body = {"model": "x", "prompt": "one two three", "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", setup["url"] + "/v1/completions", json=body,
                      headers={**AUTH, "X-User": "alice"}, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = b"".join(r.iter_raw())
    events = [ln for ln in text.decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    tokens = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in tokens if c["choices"]) == "".join(
        f" tok{i}" for i in range(40))
    assert tokens[-1]["usage"]["completion_tokens"] == 40

    # 2000 tokens take the upstream >= 10 s; the first one is here long before
    body["max_tokens"] = 2000
    with httpx.stream("POST", setup["url"] + "/v1/completions", json=body,
                      headers={**AUTH, "X-User": "alice"}, timeout=10) as r:
        upstream = setup[r.headers["x-heapr-arm"]]
        before = httpx.get(upstream + "/stats", timeout=5).json()["finished"]
        seen = b""
        for chunk in r.iter_raw():
            seen += chunk
            if b"tok0" in seen:
                break
        assert httpx.get(upstream + "/stats", timeout=5).json()["finished"] == before


def test_non_streaming_chat_models_health(setup):
    url = setup["url"]
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=10, json={
        "model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == " tok0 tok1 tok2"
    assert r.headers["x-heapr-arm"] in ("a", "b")
    m = httpx.get(url + "/v1/models", headers=AUTH, timeout=5)
    assert m.status_code == 200 and m.json()["data"][0]["id"] == "dense-stub"
    h = httpx.get(url + "/health", timeout=5).json()
    assert h["status"] == "ok" and h["arms"]["a"]["up"] and h["arms"]["b"]["model"] == "pruned-stub"


def test_api_key_passes_through_proxy_key_and_model_rewrite_do_not(setup):
    """Authorization reaches the arm untouched; the proxy's own key header is not forwarded."""
    r = httpx.post(setup["url"] + "/v1/completions", timeout=10,
                   json={"model": "client-name", "prompt": "p", "max_tokens": 1},
                   headers={**AUTH, "Authorization": "Bearer sk-upstream-123", "X-User": "carol"})
    assert r.status_code == 200
    seen = httpx.get(setup[r.headers["x-heapr-arm"]] + "/stats", timeout=5).json()
    assert seen["last_authorization"] == "Bearer sk-upstream-123"
    assert seen["last_model"] == "client-name"
    assert "x-heapr-proxy-key" not in seen["last_headers"]
    # with --model-a/--model-b, each arm gets its own model name
    with proxy(setup["a"], setup["b"], share_b=1.0, model_a="dense-x", model_b="pruned-y") as srv:
        r = httpx.post(srv.url + "/v1/completions", timeout=10,
                       json={"model": "client-name", "prompt": "p", "max_tokens": 1})
        assert r.status_code == 200 and r.headers["x-heapr-arm"] == "b"
        assert httpx.get(setup["b"] + "/stats", timeout=5).json()["last_model"] == "pruned-y"
        text = _metrics(srv.url)
        assert read_counter_sum(text, "heapr_ab_requests_total", arm="b", model="pruned-y",
                                outcome="ok") == 1
    # without them, a request naming the other arm's model gets this arm's (learnt from /v1/models)
    with proxy(setup["a"], setup["b"], share_b=1.0) as srv:
        for asked, seen_by_b in (("dense-stub", "pruned-stub"), ("custom", "custom")):
            r = httpx.post(srv.url + "/v1/completions", timeout=10,
                           json={"model": asked, "prompt": "p", "max_tokens": 1})
            assert r.status_code == 200 and r.headers["x-heapr-arm"] == "b"
            assert httpx.get(setup["b"] + "/stats", timeout=5).json()["last_model"] == seen_by_b


def test_sticky_header_and_split(setup):
    """The same X-User always lands on the same arm; over many users the share is about 0.5."""
    url = setup["url"]
    body = {"model": "x", "prompt": "p", "max_tokens": 1}
    with httpx.Client(timeout=10, headers=AUTH) as c:
        arms = {c.post(url + "/v1/completions", json=body, headers={"X-User": "bob"}).headers[
            "x-heapr-arm"] for _ in range(8)}
        assert len(arms) == 1
        users = [c.post(url + "/v1/completions", json=body, headers={"X-User": f"user-{i}"}).headers[
            "x-heapr-arm"] for i in range(120)]
    # the hash of each name is fixed: 120 users split 0.5 give B this many, every run
    assert users.count("b") == sum(
        int.from_bytes(hashlib.sha256(f"user-{i}".encode()).digest()[:8], "big") < 2 ** 63
        for i in range(120))
    assert 40 < users.count("b") < 80
    text = _metrics(url)
    assigned = read_counter_sum(text, "heapr_ab_assigned_total")
    assert assigned >= 128
    assert read_counter_sum(text, "heapr_ab_assigned_total", arm="b") >= users.count("b")


def test_random_split_follows_share(setup):
    """Without a sticky header each request is drawn at random: over 160 requests with share 0.25
    B gets its binomial share (seeded, so the draw and this test are the same every run), the
    response header says where each went, and the counters agree with the headers."""
    n, share = 160, 0.25
    with proxy(setup["a"], setup["b"], share_b=share, seed=1234) as srv:

        async def run() -> list[str]:
            async with httpx.AsyncClient(timeout=20) as c:
                sem = asyncio.Semaphore(16)

                async def one(i: int) -> str:
                    async with sem:
                        r = await c.post(srv.url + "/v1/completions",
                                         json={"prompt": f"p{i}", "max_tokens": 1})
                        assert r.status_code == 200
                        return r.headers["x-heapr-arm"]

                return await asyncio.gather(*(one(i) for i in range(n)))

        arms = asyncio.run(run())
        text = _metrics(srv.url)
    rng = random.Random(1234)
    expected = sum(rng.random() < share for _ in range(n))
    assert arms.count("b") == expected
    sigma = (n * share * (1 - share)) ** 0.5
    assert abs(expected - n * share) < 4 * sigma, expected
    for arm in "ab":
        assert read_counter_sum(text, "heapr_ab_assigned_total", arm=arm) == arms.count(arm)
        assert read_counter_sum(text, "heapr_ab_requests_total", arm=arm, outcome="ok") == \
            arms.count(arm)


def test_metrics_are_per_arm_and_model(setup):
    body = {"model": "x", "prompt": "p", "max_tokens": 10, "stream": True}
    with httpx.Client(timeout=10, headers=AUTH) as c:
        for i in range(24):
            r = c.post(setup["url"] + "/v1/completions", json=body, headers={"X-User": f"s{i}"})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    text = _metrics(setup["url"])
    # TTFT is timed from sending to the arm, and each stub waits before its first token (A 20 ms,
    # B 10 ms): no sample may land in a bucket below that, and every streamed one is somewhere
    for arm, model, below in (("a", "dense-stub", "0.01"), ("b", "pruned-stub", "0.005")):
        lab = {"arm": arm, "model": model}
        count = read_counter_sum(text, "heapr_ab_ttft_seconds_count", **lab)
        assert count > 0
        assert read_counter_sum(text, "heapr_ab_ttft_seconds_bucket", le=below, **lab) == 0
        assert read_counter_sum(text, "heapr_ab_ttft_seconds_bucket", le="+Inf", **lab) == count
        # every request sent to an arm has its proxy queue wait recorded once, on its own
        assert read_counter_sum(text, "heapr_ab_queue_wait_seconds_count", **lab) == \
            read_counter_sum(text, "heapr_ab_requests_total", **lab)
    ok_a = read_counter_sum(text, "heapr_ab_requests_total", arm="a", outcome="ok")
    ok_b = read_counter_sum(text, "heapr_ab_requests_total", arm="b", outcome="ok")
    assert ok_a > 0 and ok_b > 0
    # Each stub sleeps at least its token delay between tokens (A 10 ms, B 5 ms), so each arm's mean
    # TPOT is at least that; an upper comparison between arms would be a timing test on a shared machine.
    tpot = {arm: read_counter_sum(text, "heapr_ab_tpot_seconds_sum", arm=arm)
            / max(1.0, read_counter_sum(text, "heapr_ab_tpot_seconds_count", arm=arm))
            for arm in "ab"}
    assert tpot["a"] >= 0.0095 and tpot["b"] >= 0.0045, tpot
    # streamed requests record a TPOT on the arm that served them (the module's other tests add more)
    assert 0 < read_counter_sum(text, "heapr_ab_tpot_seconds_count", arm="a") <= ok_a
    assert 0 < read_counter_sum(text, "heapr_ab_tpot_seconds_count", arm="b") <= ok_b
    assert read_counter_sum(text, "heapr_ab_output_tokens_total") > 0


def test_malformed_requests_get_clear_errors_and_proxy_stays_up(setup):
    url = setup["url"]
    with httpx.Client(timeout=10) as c:
        r = c.post(url + "/v1/completions", content=b'{"prompt": ', headers=AUTH)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = c.post(url + "/v1/completions", json=[1, 2], headers=AUTH)
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
        r = c.post(url + "/v1/completions", json={"prompt": "x" * 20000}, headers=AUTH)
        assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]["message"]
        r = c.post(url + "/v1/completions", content=b"", headers=AUTH)
        assert r.status_code == 400
        r = c.post(url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 401 and "x-heapr-proxy-key" in r.json()["error"]["message"]
        r = c.post(url + "/v1/completions", json={"prompt": "x"}, headers={"x-heapr-proxy-key": "no"})
        assert r.status_code == 401
        assert c.get(url + "/v1/completions", headers=AUTH).status_code == 405
        assert c.get(url + "/v2/nothing", headers=AUTH).status_code == 404
        text = c.get(url + "/metrics").text
        assert read_counter_sum(text, "heapr_ab_rejected_total", reason="malformed") >= 2
        assert read_counter_sum(text, "heapr_ab_rejected_total", reason="unauthorized") >= 2
        r = c.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=AUTH)
        assert r.status_code == 200
    assert setup["server"].thread.is_alive()


def test_client_disconnect_cancels_the_upstream_request(setup):
    """Dropping the client connection closes the upstream one (vLLM then aborts the generation)."""
    url = setup["url"]

    def disconnected() -> int:
        return sum(httpx.get(setup[arm] + "/stats", timeout=5).json()["disconnected"] for arm in "ab")

    before = disconnected()
    body = {"model": "x", "prompt": "p", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=10) as r:
        next(r.iter_raw())  # a first token arrived; now hang up mid-stream
    # non-streaming: the client gives up while the proxy still waits for the upstream's headers
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": 2000},
                   headers=AUTH, timeout=httpx.Timeout(5, read=0.5))
    deadline = time.monotonic() + 5
    while disconnected() < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert disconnected() == before + 2
    text = _metrics(url)
    assert read_counter_sum(text, "heapr_ab_requests_total", outcome="client_cancelled") >= 2


def test_prompts_are_not_logged(setup, capfd):
    secret = "zebra-umbrella-prompt-7731"
    app_proxy = setup["server"].proxy
    app_proxy.cfg.log_requests = True  # the per-request log line (--log-requests) for this test
    try:
        r = httpx.post(setup["url"] + "/v1/completions", json={"prompt": secret, "max_tokens": 1},
                       headers=AUTH, timeout=10)
        assert r.status_code == 200
        # the log line is written just after the response went out: give it a moment
        seen = ""
        deadline = time.monotonic() + 5
        while "ab-proxy: /v1/completions arm=" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            out, err = capfd.readouterr()
            seen += out + err
    finally:
        app_proxy.cfg.log_requests = False
    assert "ab-proxy: /v1/completions arm=" in seen
    assert secret not in seen


def test_failover_timeouts_and_unreachable_arm_at_start(capfd):
    """B is unreachable at start, then comes up answering 503 (passed through, never resent); a hanging arm gives 504s."""
    pdead, phang, pok = free_port(), free_port(), free_port()
    dead = f"http://127.0.0.1:{pdead}"  # nothing listens here, at first
    shang = start_stub(phang, "hang", ttft=0.0, token_delay=60.0)
    sok = start_stub(pok, "fine", 0.0, 0.001)
    procs = [shang, sok]
    try:
        # 1) unreachable B at start: the proxy comes up, says so, and sends B's share to A
        with proxy(f"http://127.0.0.1:{pok}", dead, share_b=1.0, health_interval=0.3) as srv:
            url = srv.url
            h = httpx.get(url + "/health", timeout=5)
            assert h.status_code == 200 and h.json()["status"] == "degraded"
            assert f"arm b ({dead}) not reachable" in capfd.readouterr().err
            for _ in range(5):
                r = httpx.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": 2},
                               timeout=10)
                assert r.status_code == 200 and r.headers["x-heapr-arm"] == "a"
            text = _metrics(url)
            assert read_counter_sum(text, "heapr_ab_failovers_total", from_arm="b", to_arm="a",
                                    reason="down") == 5
            assert read_counter_sum(text, "heapr_ab_requests_total", arm="a", outcome="ok") == 5
            assert read_counter_sum(text, "heapr_ab_requests_total", arm="a", assigned="b") == 5
            # B's share served by A while B was down: counted, but never in A's latency (no ratio skews)
            assert read_counter_sum(text, "heapr_ab_e2e_latency_seconds_count", arm="a") == 0
            assert read_counter_sum(text, "heapr_ab_upstream_up", arm="b") == 0

            # 2) B comes up but answers 503: the health check sees it up, requests go to B and the
            #    client gets B's 503 (a gateway may send one after forwarding: never resent to A);
            #    with both gone, a clear 502 right away
            procs.append(start_stub(pdead, "broken", 0.0, 0.0, fail_status=503))
            deadline = time.monotonic() + 10
            while not httpx.get(url + "/health", timeout=5).json()["arms"]["b"]["up"]:
                assert time.monotonic() < deadline, "proxy never saw arm b come up"
                time.sleep(0.1)
            assert "arm b" in capfd.readouterr().err  # "back up"
            r = httpx.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": 2}, timeout=10)
            assert r.status_code == 503 and r.headers["x-heapr-arm"] == "b"
            text = _metrics(url)
            assert read_counter_sum(text, "heapr_ab_failovers_total", from_arm="b") == 5  # the 5 while B was down
            assert read_counter_sum(text, "heapr_ab_requests_total", arm="b", outcome="upstream_5xx") == 1
            stop(sok)
            stop(procs.pop())
            r = httpx.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": 2}, timeout=10)
            assert r.status_code == 502
            msg = r.json()["error"]["message"]
            assert "no arm could answer" in msg and "arm a ConnectError" in msg, msg
            assert httpx.get(url + "/health", timeout=5).status_code in (200, 503)
        procs.append(start_stub(pdead, "broken", 0.0, 0.0, fail_status=503))  # B answering 503 again

        # 3) no failover: B's 503 is passed through as is; a hanging A gives 504 after --timeout
        #    (never before), and a stream that stalls after its first token an SSE error event
        #    after --idle-timeout
        with proxy(f"http://127.0.0.1:{phang}", dead, share_b=0.0, timeout=1.5, idle_timeout=1.5,
                   failover=False) as srv:
            url = srv.url
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": 5}, timeout=10)
            assert r.status_code == 504 and "--timeout" in r.json()["error"]["message"]
            assert time.perf_counter() - t0 >= 1.5
            r = httpx.post(url + "/v1/completions", timeout=10,
                           json={"prompt": "p", "max_tokens": 5, "stream": True})
            assert r.status_code == 200 and " tok0" in r.text
            last = [ln for ln in r.text.splitlines() if ln.startswith("data: ")][-1]
            err = json.loads(last[6:])["error"]
            assert err["code"] == 504 and "--idle-timeout" in err["message"], err
            text = _metrics(url)
            assert read_counter_sum(text, "heapr_ab_requests_total", arm="a", outcome="timeout") == 2
            # both timeouts are censored latency samples at the moment they were given up (>= 1.5 s
            # each): an arm cannot look fast by timing out its slowest requests
            assert read_counter_sum(text, "heapr_ab_e2e_latency_seconds_count", arm="a") == 2
            assert read_counter_sum(text, "heapr_ab_e2e_latency_seconds_sum", arm="a") >= 3.0
            assert read_counter_sum(text, "heapr_ab_ttft_seconds_count", arm="a") == 2
        with proxy(f"http://127.0.0.1:{phang}", dead, share_b=1.0, failover=False) as srv:
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "p"}, timeout=10)
            assert r.status_code == 503 and r.headers["x-heapr-arm"] == "b"
            text = _metrics(srv.url)
            assert read_counter_sum(text, "heapr_ab_requests_total", outcome="upstream_5xx") == 1
    finally:
        for p in procs:
            stop(p)


@pytest.mark.parametrize("args, words", [
    (["--share-b", "1.5"], "'--share-b': Input should be less than or equal to 1"),
    (["--share-b", "-0.1"], "'--share-b': Input should be greater than or equal to 0"),
    (["--a", "localhost:8000"], "--a 'localhost:8000' is not an http(s) URL"),
    (["--timeout", "0"], "'--timeout': give a positive number"),
])
def test_bad_flags_exit_2_with_one_line(args, words, monkeypatch, capsys):
    """`heapr-serve ab-proxy` with a bad value: one line naming the flag, exit code 2."""
    flags = list(args)
    for k, v in {"--a": "http://127.0.0.1:1", "--b": "http://127.0.0.1:2"}.items():
        if k not in flags:
            flags += [k, v]
    monkeypatch.setattr(sys, "argv", ["heapr-serve", "ab-proxy", *flags])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_hung_arm_is_detected_and_skipped():
    """An arm whose process hangs (SIGSTOP: connections accepted by the kernel, never answered)
    fails its health check; from then on its share goes to the other arm at once."""
    import os
    import signal

    pa, pb = free_port(), free_port()
    sa = start_stub(pa, "fine", 0.0, 0.001)
    sb = start_stub(pb, "hung", 0.0, 0.001)
    try:
        with proxy(f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}", share_b=1.0, timeout=20,
                   health_interval=0.3) as srv:
            os.kill(sb.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 10
            while httpx.get(srv.url + "/health", timeout=5).json()["arms"]["b"]["up"]:
                assert time.monotonic() < deadline, "hung arm b never reported down"
                time.sleep(0.2)
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "p", "max_tokens": 2},
                           timeout=10)
            assert r.status_code == 200 and r.headers["x-heapr-arm"] == "a"
            # not tried on B first (no timeout waited there): failed over as "down", nothing else
            assert read_counter_sum(_metrics(srv.url), "heapr_ab_failovers_total") == 1
            assert read_counter_sum(_metrics(srv.url), "heapr_ab_failovers_total", from_arm="b",
                                    reason="down") == 1
    finally:
        os.kill(sb.pid, signal.SIGCONT)
        stop(sa)
        stop(sb)


def test_request_that_reached_an_arm_is_never_sent_to_the_other(setup):
    """B reads the whole request and resets the connection (a crash mid-generation): the client
    gets a 502 saying why, and A never sees the request, so nothing is generated twice. An arm
    that refuses the connection is failed over (the request provably never reached it)."""
    with DroppingServer(free_port()) as dropper:
        with proxy(setup["a"], dropper.url, share_b=1.0) as srv:
            before = httpx.get(setup["a"] + "/stats", timeout=5).json()["started"]
            for stream in (False, True):
                r = httpx.post(srv.url + "/v1/completions", timeout=10,
                               json={"prompt": "p", "max_tokens": 3, "stream": stream})
                assert r.status_code == 502 and r.headers["x-heapr-arm"] == "b"
                msg = r.json()["error"]["message"]
                assert "failed after receiving the request" in msg and "not sent to the other" in msg
            assert dropper.received == 2
            assert httpx.get(setup["a"] + "/stats", timeout=5).json()["started"] == before
            text = _metrics(srv.url)
            assert read_counter_sum(text, "heapr_ab_failovers_total") == 0
            assert read_counter_sum(text, "heapr_ab_requests_total", arm="b",
                                    outcome="unavailable") == 2
    refused = f"http://127.0.0.1:{free_port()}"
    with proxy(setup["a"], refused, share_b=1.0) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "p", "max_tokens": 1},
                       timeout=10)
        assert r.status_code == 200 and r.headers["x-heapr-arm"] == "a"


def test_counters_add_up_per_model_and_overload_is_counted(tmp_path):
    """A request counted as assigned under one model label is counted as finished under the same
    one, even when the proxy learns the arm's model name in between; 503s of --max-inflight are
    counted; /health and /metrics answer when the limit is reached; a stream that keeps producing
    runs past --timeout and --idle-timeout (they bound waits, not lengths)."""
    pa, pb = free_port(), free_port()
    sa = start_stub(pa, "dense-stub", ttft=0.0, token_delay=0.01)
    sb = start_stub(pb, "pruned-stub", ttft=0.0, token_delay=0.01, models_off=True)
    a, b = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
    try:
        with proxy(a, b, share_b=1.0, health_interval=0.1, max_inflight=2, timeout=1.0,
                   idle_timeout=1.0) as srv:
            assert httpx.get(srv.url + "/health", timeout=5).json()["arms"]["b"]["model"] == "unknown"
            long_body = {"prompt": "p", "max_tokens": 2000, "stream": True}  # >= 20 s of tokens
            with httpx.Client(timeout=10) as c, c.stream("POST", srv.url + "/v1/completions",
                                                         json=long_body) as first:
                chunks_1 = first.iter_raw()  # (kept: dropping the iterator closes the response)
                next(chunks_1)  # assigned and streaming while B's model is still unknown
                with c.stream("POST", srv.url + "/v1/completions", json=long_body) as second:
                    chunks_2 = second.iter_raw()
                    next(chunks_2)
                    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "p"}, timeout=10)
                    assert r.status_code == 503 and "--max-inflight 2" in r.json()["error"]["message"]
                    assert httpx.get(srv.url + "/metrics", timeout=5).status_code == 200
                    assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
                httpx.post(b + "/admin/models-on", timeout=5)
                deadline = time.monotonic() + 10
                while httpx.get(srv.url + "/health", timeout=5).json()["arms"]["b"]["model"] != \
                        "pruned-stub":
                    assert time.monotonic() < deadline, "the proxy never learnt B's model"
                    time.sleep(0.05)
            # (both long streams were hung up on: client_cancelled, under the label they began with)
            r = httpx.post(srv.url + "/v1/completions", timeout=10,  # >= 1.5 s of tokens
                           json={"prompt": "p", "max_tokens": 150, "stream": True})
            assert r.text.endswith("data: [DONE]\n\n")  # not cut at --timeout or --idle-timeout
            deadline = time.monotonic() + 5
            while read_counter_sum(_metrics(srv.url), "heapr_ab_requests_total") < 3:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            text = _metrics(srv.url)
        for model, n in (("unknown", 2), ("pruned-stub", 1)):
            lab = {"arm": "b", "model": model}
            assert read_counter_sum(text, "heapr_ab_assigned_total", **lab) == n, model
            assert read_counter_sum(text, "heapr_ab_requests_total", **lab) == n, model
            assert read_counter_sum(text, "heapr_ab_in_flight", **lab) == 0
        assert read_counter_sum(text, "heapr_ab_requests_total", outcome="ok") == 1
        assert read_counter_sum(text, "heapr_ab_requests_total", outcome="client_cancelled") == 2
        assert read_counter_sum(text, "heapr_ab_rejected_total", reason="overloaded") == 1
    finally:
        stop(sa)
        stop(sb)


def test_model_label_follows_a_redeploy(capfd):
    """An arm redeployed under another model name is counted under the new name from the next health
    poll on: the label is re-read on every poll, not learnt once and kept."""
    pa, pb = free_port(), free_port()
    a, b = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
    procs = [start_stub(pa, "dense-stub", 0.0, 0.001), start_stub(pb, "pruned-v1", 0.0, 0.001)]
    try:
        with proxy(a, b, share_b=1.0, health_interval=0.1) as srv:
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "p", "max_tokens": 2}, timeout=10)
            assert r.status_code == 200 and r.headers["x-heapr-arm"] == "b"
            stop(procs.pop())
            procs.append(start_stub(pb, "pruned-v2", 0.0, 0.001))  # the redeploy, same address
            deadline = time.monotonic() + 10
            while httpx.get(srv.url + "/health", timeout=5).json()["arms"]["b"]["model"] != "pruned-v2":
                assert time.monotonic() < deadline, "the proxy never saw B's new model"
                time.sleep(0.05)
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "p", "max_tokens": 2}, timeout=10)
            assert r.status_code == 200
            text = _metrics(srv.url)
            for model in ("pruned-v1", "pruned-v2"):
                assert read_counter_sum(text, "heapr_ab_requests_total", arm="b", model=model, outcome="ok") == 1, model
            assert read_counter_sum(text, "heapr_ab_upstream_up", arm="b", model="pruned-v1") == 0
            assert read_counter_sum(text, "heapr_ab_upstream_up", arm="b", model="pruned-v2") == 1
            assert "arm b" in (err := capfd.readouterr().err) and "now serves pruned-v2 (was pruned-v1)" in err, err
    finally:
        for p in procs:
            stop(p)
