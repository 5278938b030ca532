"""Shadow mode of ab-proxy (`--shadow-rate`): both arms also answer a greedy probe of a sampled share
of requests, and their outputs are compared, while the user's answer and latency metrics stay as they
were.

Over real sockets, in front of OpenAI-compatible stub servers whose greedy answers are known: one arm
answering like the other (every comparison a match), one diverging after 3 tokens (first difference at
token 3, log-likelihood gap 1.4 / 4 nats per token over the shared context), a bounded number of
comparisons at once (the rest dropped and counted), and a failing arm (failed, never retried).
"""

from __future__ import annotations

import time

import httpx
import pytest

from heapr_serve.ab.metrics import read_counter_sum
from heapr_serve.ab.shadow import compare
from tests.helpers.openai_stub import free_port, start_stub, stop
from tests.test_ab_proxy import _metrics, proxy


@pytest.fixture(scope="module")
def arms():
    ports = {name: free_port() for name in ("dense", "same", "diverging")}
    procs = [start_stub(ports["dense"], "dense-stub", ttft=0.0, token_delay=0.002),
             start_stub(ports["same"], "same-stub", ttft=0.0, token_delay=0.002),
             start_stub(ports["diverging"], "diverging-stub", ttft=0.0, token_delay=0.002, diverge_after=3)]
    yield {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    for p in procs:
        stop(p)


def _wait_for(url: str, n: int, **labels) -> str:
    deadline = time.monotonic() + 10
    while True:
        text = _metrics(url)
        if read_counter_sum(text, "heapr_ab_shadow_total", **labels) >= n:
            return text
        assert time.monotonic() < deadline, f"fewer than {n} shadow comparisons {labels}"
        time.sleep(0.05)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_shadow_agreement_and_divergence_are_measured(arms, endpoint):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    body = ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8} if endpoint == "chat"
            else {"prompt": "p", "max_tokens": 8, "stream": True})
    with proxy(arms["dense"], arms["same"], share_b=0.0, shadow_rate=1.0, seed=1) as srv:
        for _ in range(4):
            r = httpx.post(srv.url + path, json=body, timeout=10)
            assert r.status_code == 200 and r.headers["x-heapr-arm"] == "a"
        text = _wait_for(srv.url, 4, arm="a")
        assert read_counter_sum(text, "heapr_ab_shadow_total", arm="a", result="match") == 4
        assert read_counter_sum(text, "heapr_ab_shadow_first_diff_tokens_count") == 0
        assert read_counter_sum(text, "heapr_ab_shadow_logprob_gap_sum") == 0  # same log-probs everywhere
        # the probes are the proxy's own: never in the user's request or latency counts
        assert read_counter_sum(text, "heapr_ab_requests_total") == 4
        assert read_counter_sum(text, "heapr_ab_e2e_latency_seconds_count") == 4
    with proxy(arms["dense"], arms["diverging"], share_b=0.0, shadow_rate=1.0, seed=1) as srv:
        for _ in range(5):
            r = httpx.post(srv.url + path, json=body, timeout=10)
            assert r.status_code == 200 and "alt" not in r.text  # the user gets A's answer, only
        text = _wait_for(srv.url, 5, arm="a")
        assert read_counter_sum(text, "heapr_ab_shadow_total", arm="a", result="differ") == 5
        assert read_counter_sum(text, "heapr_ab_shadow_first_diff_tokens_sum") == 5 * 3
        # tokens 0-2 shared at equal log-probs, token 3: A's " tok3" is -0.1 under A, -1.5 under B
        gap = read_counter_sum(text, "heapr_ab_shadow_logprob_gap_sum") / 5
        assert gap == pytest.approx(1.4 / 4)


def test_shadow_is_bounded_and_never_retried(arms):
    dead = f"http://127.0.0.1:{free_port()}"
    with proxy(arms["dense"], dead, share_b=0.0, shadow_rate=1.0, seed=1, shadow_max_inflight=2) as srv:
        for _ in range(3):
            assert httpx.post(srv.url + "/v1/completions", json={"prompt": "p", "max_tokens": 4}, timeout=10).status_code == 200
        text = _wait_for(srv.url, 3)
        assert read_counter_sum(text, "heapr_ab_shadow_total", result="failed") == 3  # B unreachable: failed, once each
        assert read_counter_sum(text, "heapr_ab_requests_total", outcome="ok") == 3
    slow = free_port()
    proc = start_stub(slow, "slow-stub", ttft=0.5, token_delay=0.0)
    try:
        with proxy(arms["dense"], f"http://127.0.0.1:{slow}", share_b=0.0, shadow_rate=1.0, seed=1, shadow_max_inflight=2) as srv:
            with httpx.Client(timeout=10) as c:
                for _ in range(6):  # while two comparisons wait for the slow arm, the others are dropped
                    assert c.post(srv.url + "/v1/completions", json={"prompt": "p", "max_tokens": 2}).status_code == 200
            text = _wait_for(srv.url, 6)
            assert read_counter_sum(text, "heapr_ab_shadow_total", result="dropped") >= 3
            assert read_counter_sum(text, "heapr_ab_shadow_total", result="match") + \
                read_counter_sum(text, "heapr_ab_shadow_total", result="dropped") == 6
    finally:
        stop(proc)


def test_compare_without_logprobs_compares_texts():
    a = {"choices": [{"text": " x y"}]}
    assert compare(a, {"choices": [{"text": " x y"}]}) == {"match": True, "first_diff": None, "logprob_gap": None}
    assert compare(a, {"choices": [{"text": " x z"}]})["match"] is False
