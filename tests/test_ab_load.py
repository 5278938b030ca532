"""Bounded loopback load test of the real `heapr-serve ab-proxy` command, with an arm killed mid-run.

500 requests at concurrency 32 (mostly streaming) go through the proxy to two stub upstreams; after
150 have finished, arm B is killed with SIGKILL. Every request must finish within its timeout,
answered or with a clear error (an HTTP 502/504 with an OpenAI error body, or an SSE error event
for a stream that B was serving when it died); the proxy's per-arm counters must add up to the
requests sent; and its resident memory must not grow between a warm-up round and the end.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx

from heapr_serve.ab.metrics import read_counter_sum
from tests.helpers.openai_stub import free_port, heapr_serve_exe, spawn, start_stub, stop, wait_http

N, CONCURRENCY, KILL_AFTER, WARMUP = 500, 32, 150, 200
PROXY_TIMEOUT = 10.0
CLIENT_TIMEOUT = PROXY_TIMEOUT + 5.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def one(client: httpx.AsyncClient, url: str, i: int) -> dict:
    """One request, classified: ok, or a clear error (status/error event), with its duration."""
    stream = i % 4 != 0
    body = {"model": "m", "prompt": f"request {i}", "max_tokens": 8, "stream": stream}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            raw = await r.aread()
            arm = r.headers.get("x-heapr-arm")
            status = r.status_code
    except httpx.HTTPError as exc:  # a cut connection: not a clear error, the test fails on it
        return {"kind": f"transport:{exc.__class__.__name__}", "s": time.perf_counter() - t0}
    s = time.perf_counter() - t0
    text = raw.decode()
    if status == 200 and stream:
        events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
        if events and events[-1] == "[DONE]":
            return {"kind": "ok", "s": s, "arm": arm}
        err = json.loads(events[-1]).get("error") if events else None
        return {"kind": f"sse_error:{err['code']}" if err else "truncated", "s": s, "arm": arm}
    if status == 200:
        return {"kind": "ok" if json.loads(text)["choices"] else "empty", "s": s, "arm": arm}
    err = json.loads(text)["error"]
    return {"kind": f"http:{status}", "s": s, "arm": arm, "msg": err["message"]}


async def drive(url: str, n: int, on_done=None) -> list[dict]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    results: list[dict] = []
    todo = list(range(n))
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:

        async def worker() -> None:
            while todo:
                i = todo.pop()
                results.append(await one(client, url, i))
                if on_done:
                    on_done(len(results))

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))),
                               timeout=120)
    return results


def test_500_requests_arm_killed_mid_run(tmp_path):
    pa, pb, pp = free_port(), free_port(), free_port()
    sa = start_stub(pa, "dense-stub", ttft=0.005, token_delay=0.003)
    sb = start_stub(pb, "pruned-stub", ttft=0.005, token_delay=0.003)
    proxy = spawn([heapr_serve_exe(), "ab-proxy", "--a", f"http://127.0.0.1:{pa}",
                   "--b", f"http://127.0.0.1:{pb}", "--share-b", "0.5", "--port", str(pp),
                   "--timeout", str(PROXY_TIMEOUT), "--connect-timeout", "2",
                   "--max-connections", "48", "--health-interval", "0.5"], tmp_path / "proxy.log")
    url = f"http://127.0.0.1:{pp}"
    try:
        wait_http(url + "/health", proxy, timeout=120)
        warm = asyncio.run(drive(url, WARMUP))
        assert all(r["kind"] == "ok" for r in warm), {r["kind"] for r in warm}
        rss_warm = rss_mib(proxy.pid)

        killed = {}

        def maybe_kill(done: int) -> None:
            if done >= KILL_AFTER and not killed:
                killed["at"] = done
                stop(sb, signal.SIGKILL)

        t0 = time.perf_counter()
        results = asyncio.run(drive(url, N, maybe_kill))
        wall = time.perf_counter() - t0
        rss_end = rss_mib(proxy.pid)

        assert killed and len(results) == N
        kinds: dict[str, int] = {}
        for r in results:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        print(f"\n{N} requests in {wall:.1f}s, B killed after {killed['at']}: {kinds}; "
              f"proxy RSS {rss_warm:.1f} -> {rss_end:.1f} MiB")
        # every request finished within its timeout, answered or with a clear error
        assert max(r["s"] for r in results) < CLIENT_TIMEOUT
        clear = {"ok", "sse_error:502", "sse_error:504", "http:502", "http:504"}
        assert set(kinds) <= clear, kinds
        # only requests B was streaming when it died may fail; the rest fail over to A
        assert kinds.get("ok", 0) >= N - CONCURRENCY, kinds
        late = [r for r in results[KILL_AFTER + CONCURRENCY:] if r["kind"] == "ok"]
        assert late and all(r["arm"] == "a" for r in late)

        text = httpx.get(url + "/metrics", timeout=5).text
        total = read_counter_sum(text, "heapr_ab_requests_total")
        assert total == WARMUP + N
        assert read_counter_sum(text, "heapr_ab_assigned_total") == WARMUP + N
        per_arm = {arm: read_counter_sum(text, "heapr_ab_requests_total", arm=arm) for arm in "ab"}
        assert per_arm["a"] + per_arm["b"] == WARMUP + N
        ok = read_counter_sum(text, "heapr_ab_requests_total", outcome="ok")
        assert ok == WARMUP + kinds.get("ok", 0)
        assert read_counter_sum(text, "heapr_ab_failovers_total", from_arm="b", to_arm="a") > 0
        assert read_counter_sum(text, "heapr_ab_upstream_up", arm="b") == 0
        assert read_counter_sum(text, "heapr_ab_in_flight") == 0
        # memory: no growth from the warmed-up proxy to the end (allow allocator noise)
        assert rss_end - rss_warm < 16, (rss_warm, rss_end)
        assert proxy.poll() is None
    finally:
        for p in (proxy, sa, sb):
            stop(p)
