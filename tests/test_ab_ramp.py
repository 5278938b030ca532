"""The guarded ramp of ab-proxy (`--ramp 5,25,50,100 --step-after N`), over real sockets in front of
stub servers: a B as fast as A climbs every step to 100%; a slow B, a failing B, or a B whose greedy
answers differ (shadow comparisons) is rolled back to 0 at the first window, with a reason naming the
failed check, and a B that slows down mid-run after it climbed a step; the state survives a restart of the proxy through its state file."""

from __future__ import annotations

import json

import httpx
import pytest

from heapr_serve.ab.metrics import read_counter_sum
from heapr_serve.ab.ramp import RampChecks
from tests.helpers.openai_stub import free_port, start_stub, stop
from tests.test_ab_proxy import _metrics, proxy


@pytest.fixture(scope="module")
def arms():
    ports = {n: free_port() for n in ("a", "same", "slow", "failing", "diverging", "slowing")}
    procs = [start_stub(ports["a"], "dense-stub", 0.0, 0.002), start_stub(ports["same"], "pruned-stub", 0.0, 0.002),
             start_stub(ports["slow"], "slow-stub", 0.05, 0.02), start_stub(ports["failing"], "failing-stub", 0.0, 0.0, fail_status=500),
             start_stub(ports["diverging"], "diverging-stub", 0.0, 0.002, diverge_after=1),
             start_stub(ports["slowing"], "slowing-stub", 0.0, 0.002, slow_after=12)]
    yield {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    for p in procs:
        stop(p)


def _drive(url: str, n: int) -> None:
    with httpx.Client(timeout=10) as c:
        for _ in range(n):
            c.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": 4})


def _status(url: str) -> dict:
    return httpx.get(url + "/ab/status", timeout=5).json()["ramp"]


def test_a_good_arm_climbs_every_step(arms, tmp_path):
    state = tmp_path / "ramp.json"
    with proxy(arms["a"], arms["same"], ramp_steps=[25, 50, 100], step_after=8, ramp_state=str(state), seed=3,
               ramp_checks=RampChecks(latency_ratio=3.0)) as srv:
        assert _status(srv.url)["share_b"] == 0.25
        _drive(srv.url, 150)
        status = _status(srv.url)
        assert status["state"] == "complete" and status["share_b"] == 1.0, status
        text = _metrics(srv.url)
        assert read_counter_sum(text, "heapr_ab_ramp_share") == 1.0
        assert read_counter_sum(text, "heapr_ab_ramp_state", state="complete") == 1
    assert json.loads(state.read_text())["state"] == "complete"


@pytest.mark.parametrize("b, checks, shadow, says", [
    ("slow", RampChecks(latency_ratio=1.5), 0.0, "latency: B's median"),
    ("failing", RampChecks(), 0.0, "error rate"),
    ("diverging", RampChecks(latency_ratio=3.0, agreement=0.9), 1.0, "agreement: 0% of"),
])
def test_a_bad_arm_is_rolled_back_with_the_failed_check(arms, tmp_path, b, checks, shadow, says):
    state = tmp_path / "ramp.json"
    with proxy(arms["a"], arms[b], ramp_steps=[50, 100], step_after=6, ramp_state=str(state), seed=3,
               ramp_checks=checks, shadow_rate=shadow) as srv:
        _drive(srv.url, 60)
        status = _status(srv.url)
        assert status["state"] == "rolled_back" and status["share_b"] == 0.0, status
        assert says in status["last_change"]["reason"], status
        assert read_counter_sum(_metrics(srv.url), "heapr_ab_ramp_state", state="rolled_back") == 1
        before = read_counter_sum(_metrics(srv.url), "heapr_ab_assigned_total", arm="b")
        _drive(srv.url, 10)
        assert read_counter_sum(_metrics(srv.url), "heapr_ab_assigned_total", arm="b") == before  # B gets nothing now
    # a restart resumes from the state file: still rolled back, with the reason
    with proxy(arms["a"], arms[b], ramp_steps=[50, 100], step_after=6, ramp_state=str(state), seed=3, ramp_checks=checks) as srv:
        status = _status(srv.url)
        assert status["state"] == "rolled_back" and status["share_b"] == 0.0 and says in status["last_change"]["reason"]


def test_an_arm_that_slows_down_mid_run_is_rolled_back_after_climbing(arms, tmp_path):
    """B answers as fast as A for its first 12 requests, then fifty times slower (a server that slows
    down mid-run): it passes the first step, and the next window rolls it back to 0, naming latency."""
    with proxy(arms["a"], arms["slowing"], ramp_steps=[25, 50, 100], step_after=8, seed=3,
               ramp_checks=RampChecks(latency_ratio=3.0)) as srv:
        seen = []
        with httpx.Client(timeout=10) as c:
            for _ in range(200):
                c.post(srv.url + "/v1/completions", json={"prompt": "p", "max_tokens": 4})
                status = _status(srv.url)
                if not seen or seen[-1] != (status["state"], status["step"]):
                    seen.append((status["state"], status["step"]))
                if status["state"] == "rolled_back":
                    break
        assert seen[:2] == [("ramping", 0), ("ramping", 1)] and seen[-1] == ("rolled_back", 1), seen
        assert status["share_b"] == 0.0 and "latency: B's median" in status["last_change"]["reason"], status


def test_the_command_runs_a_ramp_with_shadow_comparisons(arms, tmp_path):
    """The real `heapr-serve ab-proxy --ramp ... --shadow-rate ...` command: it listens, says so, and
    /ab/status shows the ramp's first step."""
    from tests.helpers.openai_stub import heapr_serve_exe, spawn, wait_http

    port = free_port()
    proc = spawn([heapr_serve_exe(), "ab-proxy", "--a", arms["a"], "--b", arms["same"], "--port", str(port), "--ramp", "5,100",
                  "--step-after", "50", "--shadow-rate", "0.5", "--ramp-state", str(tmp_path / "state.json")], tmp_path / "proxy.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc, timeout=30)
        status = httpx.get(url + "/ab/status", timeout=5).json()
        assert status["share_b"] == 0.05 and status["shadow_rate"] == 0.5 and status["ramp"]["state"] == "ramping", status
        assert httpx.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": 2}, timeout=10).status_code == 200
    finally:
        stop(proc)
    assert "ramp=5,100 (now 0.05)" in (tmp_path / "proxy.log").read_text()


def test_status_reports_the_windows_ratios_with_intervals(arms):
    """/ab/status is the proxy's report: the window's B/A median latencies with 95% intervals and a
    reading. A slow B is "B slower" with its whole interval above 1; the statistics on their own
    (deterministic): one latency sample against itself holds 1.0, and agreement gets a Wilson interval."""
    from heapr_serve.ab.ramp import _Window, window_ratios

    with proxy(arms["a"], arms["slow"], ramp_steps=[50, 100], step_after=10_000, seed=3,
               ramp_checks=RampChecks(latency_ratio=100.0)) as srv:
        _drive(srv.url, 40)
        ratios = _status(srv.url)["window"]["ratios"]
        e2e = ratios["e2e_p50"]
        assert e2e["reading"] == "B slower" and e2e["interval"][0] > 1.0 and e2e["ratio"] > 2, ratios
    w = _Window()
    sample = [0.1 + 0.01 * ((i * 7) % 11) for i in range(40)]
    w.e2e = {"a": sample, "b": list(reversed(sample))}
    w.shadow_pairs, w.shadow_matches = 20, 15
    r = window_ratios(w)
    assert r["e2e_p50"]["reading"] == "no difference measured" and r["e2e_p50"]["interval"][0] <= 1.0 <= r["e2e_p50"]["interval"][1]
    lo, hi = r["shadow_agreement"]["interval"]
    assert lo < 0.75 < hi and r["shadow_agreement"]["share"] == 0.75
    w.e2e = {"a": sample[:3], "b": sample[:3]}
    assert window_ratios(w)["e2e_p50"]["reading"] == "too few requests for an interval"
