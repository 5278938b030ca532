"""`heapr-serve ab-proxy` over real HTTP, in front of two stub OpenAI servers.

The stubs (tests/helpers/openai_stub.py) are the upstreams, with known timings: A gives its first
token after 20 ms and then one every 10 ms, B is twice as fast. The proxy runs in this process under
uvicorn on a real socket (the same app the command serves; starting the command costs an interpreter
start-up per configuration, which tests/test_ab_load.py pays once). Everything is observed from
outside, as a client and a Prometheus scraper would.
"""

from __future__ import annotations

import json
import sys
import time

import httpx
import pytest

from heapr_serve import cli
from heapr_serve.ab.metrics import read_counter_sum
from heapr_serve.ab.proxy import ABProxy, ProxyConfig
from tests.helpers.openai_stub import ServerThread, free_port, start_stub, stop

KEY = "s3cret-proxy-key"
AUTH = {"x-heapr-proxy-key": KEY}


def proxy(a: str, b: str, **kw) -> ServerThread:
    """The proxy app on a free loopback port (use as a context manager); `.proxy` is the ABProxy."""
    ab = ABProxy(ProxyConfig(a_url=a, b_url=b, **kw))
    srv = ServerThread(ab.app, free_port())
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
    """Events reach the client as the upstream makes them: first one long before the last."""
    body = {"model": "x", "prompt": "one two three", "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}}
    arrivals = []
    t0 = time.perf_counter()
    with httpx.stream("POST", setup["url"] + "/v1/completions", json=body,
                      headers={**AUTH, "X-User": "alice"}, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        arm = r.headers["x-heapr-arm"]
        text = b""
        for chunk in r.iter_raw():
            arrivals.append(time.perf_counter() - t0)
            text += chunk
    events = [ln for ln in text.decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    tokens = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in tokens if c["choices"]) == "".join(
        f" tok{i}" for i in range(40))
    assert tokens[-1]["usage"]["completion_tokens"] == 40
    # the upstream spends >= 0.2 s (B) or 0.4 s (A) between its first and last token: the client
    # must see them spread over (most of) that time, in many reads, not in one lump at the end
    spread = 0.195 if arm == "b" else 0.39
    assert len(arrivals) >= 10
    assert arrivals[-1] - arrivals[0] >= 0.8 * spread, (arrivals[0], arrivals[-1])


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
    share = users.count("b") / len(users)
    assert 0.3 < share < 0.7, share
    text = _metrics(url)
    assigned = read_counter_sum(text, "heapr_ab_assigned_total")
    assert assigned >= 128
    assert read_counter_sum(text, "heapr_ab_assigned_total", arm="b") >= users.count("b")


def test_metrics_are_per_arm_and_model(setup):
    body = {"model": "x", "prompt": "p", "max_tokens": 10, "stream": True}
    with httpx.Client(timeout=10, headers=AUTH) as c:
        for i in range(24):
            r = c.post(setup["url"] + "/v1/completions", json=body, headers={"X-User": f"s{i}"})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    text = _metrics(setup["url"])
    assert 'heapr_ab_ttft_seconds_bucket{arm="a",le="0.025",model="dense-stub"}' in text
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
    """B is unreachable at start, then comes up answering 503; a hanging arm gives 504s."""
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
            assert read_counter_sum(text, "heapr_ab_upstream_up", arm="b") == 0

            # 2) B comes up but answers 503: the health check sees it up, requests go to B, get
            #    503, and fail over to A; with A gone too, a clear 502 right away
            procs.append(start_stub(pdead, "broken", 0.0, 0.0, fail_status=503))
            deadline = time.monotonic() + 10
            while not httpx.get(url + "/health", timeout=5).json()["arms"]["b"]["up"]:
                assert time.monotonic() < deadline, "proxy never saw arm b come up"
                time.sleep(0.1)
            assert "arm b" in capfd.readouterr().err  # "back up"
            r = httpx.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": 2}, timeout=10)
            assert r.status_code == 200 and r.headers["x-heapr-arm"] == "a"
            assert read_counter_sum(_metrics(url), "heapr_ab_failovers_total", reason="http_503") == 1
            stop(sok)
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": 2}, timeout=10)
            assert r.status_code == 502 and time.perf_counter() - t0 < 5
            assert "no arm could answer" in r.json()["error"]["message"]
            assert httpx.get(url + "/health", timeout=5).status_code in (200, 503)

        # 3) no failover: B's 503 is passed through as is; a hanging A gives 504 within --timeout,
        #    also after its stream started (then as an SSE error event)
        with proxy(f"http://127.0.0.1:{phang}", dead, share_b=0.0, timeout=1.5,
                   failover=False) as srv:
            url = srv.url
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": 5}, timeout=10)
            assert r.status_code == 504 and "--timeout" in r.json()["error"]["message"]
            assert 1.4 < time.perf_counter() - t0 < 4
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", timeout=10,
                           json={"prompt": "p", "max_tokens": 5, "stream": True})
            assert r.status_code == 200 and 1.4 < time.perf_counter() - t0 < 4
            last = [ln for ln in r.text.splitlines() if ln.startswith("data: ")][-1]
            assert json.loads(last[6:])["error"]["code"] == 504
            assert read_counter_sum(_metrics(url), "heapr_ab_requests_total", arm="a",
                                    outcome="timeout") == 2
        with proxy(f"http://127.0.0.1:{phang}", dead, share_b=1.0, failover=False) as srv:
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "p"}, timeout=10)
            assert r.status_code == 503 and r.headers["x-heapr-arm"] == "b"
            text = _metrics(srv.url)
            assert read_counter_sum(text, "heapr_ab_requests_total", outcome="upstream_5xx") == 1
    finally:
        for p in procs:
            stop(p)


@pytest.mark.parametrize("args, words", [
    (["--share-b", "1.5"], "--share-b must be between 0 and 1"),
    (["--share-b", "-0.1"], "--share-b must be between 0 and 1"),
    (["--a", "localhost:8000"], "--a 'localhost:8000' is not an http(s) URL"),
    (["--timeout", "0"], "--timeout must be a positive number"),
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
            t0 = time.perf_counter()
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "p", "max_tokens": 2},
                           timeout=10)
            assert r.status_code == 200 and r.headers["x-heapr-arm"] == "a"
            assert time.perf_counter() - t0 < 2
            assert read_counter_sum(_metrics(srv.url), "heapr_ab_failovers_total", from_arm="b",
                                    reason="down") == 1
    finally:
        os.kill(sb.pid, signal.SIGCONT)
        stop(sa)
        stop(sb)
