"""A real Prometheus server scrapes the A/B proxy; the per-arm quantiles and their ratio come back
through Prometheus's HTTP API, and every query of the shipped Grafana dashboard evaluates.

Needs Debian's `prometheus` package (`apt-get install -y prometheus`; .ci/run installs it). Without
it the test fails and says so: skipping would hide that the exposition was never scraped.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from heapr_serve.ab.proxy import ABProxy, ProxyConfig
from tests.helpers.openai_stub import ServerThread, free_port, spawn, start_stub, stop, wait_http

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_CONFIG = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found: install Debian's prometheus package "
                    "(apt-get install -y prometheus), as .ci/run does")
    return path


def test_shipped_prometheus_config_is_valid():
    r = subprocess.run([_binary("promtool"), "check", "config", str(DEPLOY_CONFIG)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _by_arm(result: list[dict]) -> dict[str, float]:
    return {s["metric"].get("arm", ""): float(s["value"][1]) for s in result}


async def _traffic(url: str, n: int, concurrency: int) -> list[int]:
    async with httpx.AsyncClient(timeout=30) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> int:
            async with sem:
                r = await client.post(url + "/v1/completions", json={
                    "model": "m", "prompt": f"p{i}", "max_tokens": 10, "stream": True,
                    "stream_options": {"include_usage": True}})
                return r.status_code

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_prometheus_scrapes_per_arm_quantiles_and_ratio(tmp_path):
    prometheus = _binary("prometheus")
    pa, pb = free_port(), free_port()
    # A: first token after 150 ms, then 30 ms per token; B: 30 ms, then 10 ms. 10 tokens each:
    # end-to-end at least 0.42 s on A and 0.12 s on B, so B's quantiles are below A's (a loaded
    # machine adds to both; only the order is asserted).
    sa = start_stub(pa, "dense-stub", ttft=0.15, token_delay=0.03)
    sb = start_stub(pb, "pruned-stub", ttft=0.03, token_delay=0.01)
    procs = [sa, sb]
    proxy = ABProxy(ProxyConfig(a_url=f"http://127.0.0.1:{pa}", b_url=f"http://127.0.0.1:{pb}",
                                share_b=0.5, seed=0, shadow_rate=0.25))  # (seeded: the same split every run)
    try:
        with ServerThread(proxy.app, free_port()) as srv:
            # the shipped config, pointed at this test's proxy and scraping every second
            cfg = yaml.safe_load(DEPLOY_CONFIG.read_text())
            cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
            jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
            jobs["heapr-ab-proxy"]["static_configs"] = [{"targets": [srv.url.split("//")[1]]}]
            jobs["vllm"]["static_configs"] = [  # the stubs' own /metrics, under vLLM's names
                {"targets": [f"127.0.0.1:{pa}"], "labels": {"arm": "a"}},
                {"targets": [f"127.0.0.1:{pb}"], "labels": {"arm": "b"}}]
            (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
            pport = free_port()
            prom = f"http://127.0.0.1:{pport}"
            procs.append(spawn([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}",
                                f"--web.listen-address=127.0.0.1:{pport}",
                                "--storage.tsdb.retention.time=1h"], tmp_path / "prometheus.log"))
            wait_http(prom + "/-/ready", procs[-1], timeout=60)
            deadline = time.monotonic() + 30
            while _by_arm(_query(prom, 'up{job="heapr-ab-proxy"}')) != {"": 1.0}:
                assert time.monotonic() < deadline, "Prometheus never scraped the proxy"
                time.sleep(0.3)

            statuses = asyncio.run(_traffic(srv.url, 160, 16))
            assert statuses == [200] * 160
            time.sleep(3.0)  # two more scrapes after the last request

            # every request counted once, per arm, as Prometheus stored it
            total = _by_arm(_query(prom, "sum by (arm) (heapr_ab_requests_total)"))
            assert total["a"] + total["b"] == 160 and min(total.values()) > 30, total
            e2e = _by_arm(_query(prom, "histogram_quantile(0.5, sum by (le, arm) "
                                       "(rate(heapr_ab_e2e_latency_seconds_bucket[1m])))"))
            ttft = _by_arm(_query(prom, "histogram_quantile(0.5, sum by (le, arm) "
                                        "(rate(heapr_ab_ttft_seconds_bucket[1m])))"))
            assert e2e["a"] > 0.3 and 0.08 < e2e["b"] < e2e["a"], e2e  # (lower bounds: the stubs sleep)
            assert 0.1 < ttft["a"] and ttft["b"] < ttft["a"], ttft
            ratio = _query(prom, "histogram_quantile(0.5, sum by (le) (rate("
                                 "heapr_ab_e2e_latency_seconds_bucket{arm=\"b\"}[1m]))) / "
                                 "histogram_quantile(0.5, sum by (le) (rate("
                                 "heapr_ab_e2e_latency_seconds_bucket{arm=\"a\"}[1m])))")
            r = float(ratio[0]["value"][1])
            print(f"\nPrometheus: E2E p50 A={e2e['a']:.3f}s B={e2e['b']:.3f}s, B/A={r:.2f}; "
                  f"TTFT p50 A={ttft['a']:.3f}s B={ttft['b']:.3f}s")
            assert 0 < r < 1, r

            # every query of the shipped dashboard is valid PromQL; the heapr_ab_* ones have data
            dash = json.loads(DASHBOARD.read_text())
            exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
            assert len(exprs) >= 15
            for expr in exprs:
                res = _query(prom, expr.replace("$__rate_interval", "1m"))
                if "heapr_ab_" in expr and "failovers" not in expr:
                    assert res, f"dashboard query returned nothing: {expr}"
            # shadow comparisons reached Prometheus: the two stubs answer alike, so every pair matched
            shadow = _query(prom, "sum by (result) (heapr_ab_shadow_total)")
            counts = {s["metric"]["result"]: float(s["value"][1]) for s in shadow}
            assert counts["match"] > 10 and counts["differ"] == counts["failed"] == 0, counts
    finally:
        for p in procs:
            stop(p)
