"""The run of `heapr-serve bench`: drive the dense (A) and pruned (B) deployments with the same prompts.

Why this shape: a pruning speed-up is only worth reporting if both arms saw the same prompts, the
same output lengths and the same machine noise. So every request streams (TTFT and inter-token
latency are then what a user sees, not what a server logs), output lengths are pinned with
`ignore_eos`, and the arms run either in ABBA-ordered blocks at each load level (default: a slow
drift or a noisy neighbour hits both arms alike, and they never compete for the machine) or
concurrently on the same prompts. The output says which. Each arm's own `vllm:*` counters and
KV-cache usage are read from its `/metrics` before, during and after, as a cross-check of the
token counts and to show memory pressure.

An arm is a URL of a running OpenAI-compatible server, or a checkpoint folder that the command
(bench_command.py) serves itself with vLLM on a free local port and stops afterwards (also on Ctrl-C
or an error).
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

from heapr_serve.ab.arm import Arm
from heapr_serve.ab.bench_prompts import synthetic_prompts
from heapr_serve.ab.bench_request import Result, error_message, one_request, request_body
from heapr_serve.ab.bench_stats import RATIO_KEYS, ratios, summarize
from heapr_serve.ab.intervals import Block, ratio_intervals
from heapr_serve.ab.metrics import ABMetrics, parse_vllm_metrics
from heapr_serve.errors import HeaprError


@dataclass
class BenchArm(Arm):
    source: str = ""  # what the user gave: URL or folder
    served_here: bool = False


@dataclass
class Plan:
    mode: str  # "concurrency" or "rate"
    levels: list[float]
    num_prompts: int
    schedule: str  # "alternate" or "concurrent"
    blocks: int
    max_concurrency: int
    endpoint: str
    output_len: int
    input_len: int
    ignore_eos: bool
    warmup: int
    seed: int
    settle: float = 0.0  # idle seconds before each alternate block
    confidence: float = 0.95  # of each level's intervals, all of them together


class Bench:
    """Runs the plan against both arms; one instance per invocation."""

    def __init__(self, arms: dict[str, Arm], plan: Plan, client: httpx.AsyncClient,
                 headers: dict[str, str], metrics: ABMetrics, progress, task) -> None:
        self.arms, self.plan, self.client, self.headers = arms, plan, client, headers
        self.metrics, self.progress, self.task = metrics, progress, task
        self.path = "/v1/chat/completions" if plan.endpoint == "chat" else "/v1/completions"
        self.vllm_peak: dict[str, dict[str, float]] = {"a": {}, "b": {}}

    async def _send(self, arm: Arm, item: dict, record: bool = True) -> Result:
        body = request_body(item, arm.model, self.plan.endpoint, self.plan.output_len, self.plan.ignore_eos)
        r = await one_request(self.client, arm, body, self.path, self.headers)
        if record:
            m = self.metrics
            if r.ok:
                m.requests.labels(arm.name, arm.model, "ok", arm.name).inc()
                m.e2e.labels(arm.name, arm.model).observe(r.e2e)
                if r.ttft is not None:
                    m.ttft.labels(arm.name, arm.model).observe(r.ttft)
                if r.tpot is not None:
                    m.tpot.labels(arm.name, arm.model).observe(r.tpot)
                itl = m.itl.labels(arm.name, arm.model)
                for g in r.itl:
                    itl.observe(g)
                m.output_tokens.labels(arm.name, arm.model).inc(r.output_tokens)
                if r.prompt_tokens:
                    m.prompt_tokens.labels(arm.name, arm.model).inc(r.prompt_tokens)
            else:
                if r.timed_out:  # censored at the moment it was given up, as the proxy records them
                    m.e2e.labels(arm.name, arm.model).observe(r.e2e)
                    m.ttft.labels(arm.name, arm.model).observe(r.ttft if r.ttft is not None else r.e2e)
                outcome = "timeout" if r.timed_out else (
                    "upstream_5xx" if (r.error or "").startswith("HTTP 5") else
                    "upstream_4xx" if (r.error or "").startswith("HTTP 4") else "unavailable")
                m.requests.labels(arm.name, arm.model, outcome, arm.name).inc()
            self.progress.advance(self.task)
        return r

    async def _closed_loop(self, arm: Arm, items: list[dict], conc: int) -> list[Result]:
        """`conc` workers, each sending its next prompt as soon as its last one finished."""
        queue = list(enumerate(items))
        results: list[Result | None] = [None] * len(items)

        async def worker() -> None:
            while queue:
                i, item = queue.pop(0)
                results[i] = await self._send(arm, item)

        await asyncio.gather(*(worker() for _ in range(min(conc, len(items)))))
        return results  # type: ignore[return-value]

    async def _open_loop(self, arm: Arm, items: list[dict], gaps: list[float]) -> list[Result]:
        """Poisson arrivals (the same gaps for both arms), capped at --max-concurrency in flight."""
        sem = asyncio.Semaphore(self.plan.max_concurrency)
        results: list[Result | None] = [None] * len(items)

        async def fire(i: int, item: dict) -> None:
            async with sem:
                results[i] = await self._send(arm, item)

        tasks = []
        for i, (item, gap) in enumerate(zip(items, gaps)):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(fire(i, item)))
        await asyncio.gather(*tasks)
        return results  # type: ignore[return-value]

    async def _run_block(self, arm: Arm, items: list[dict], level: float, gaps: list[float]):
        t0 = time.perf_counter()
        if self.plan.mode == "rate":
            res = await self._open_loop(arm, items, gaps)
        else:
            res = await self._closed_loop(arm, items, int(level))
        return res, time.perf_counter() - t0

    async def poll_vllm(self, stop: asyncio.Event) -> None:
        """Sample both servers' vLLM gauges every 2 s for their peaks during the run (not more
        often: rendering /metrics costs the server CPU that the benchmark is measuring)."""
        while not stop.is_set():
            for name, arm in self.arms.items():
                vals = await scrape_vllm(self.client, arm)
                peak = self.vllm_peak[name]
                for k in ("kv_cache_usage", "requests_running", "requests_waiting"):
                    if k in vals:
                        peak[k] = max(peak.get(k, 0.0), vals[k])
            try:
                await asyncio.wait_for(stop.wait(), timeout=2.0)
            except asyncio.TimeoutError:
                pass

    async def run_level(self, level: float, items: list[dict]) -> dict:
        plan = self.plan
        a, b = self.arms["a"], self.arms["b"]
        rng = random.Random(plan.seed * 1000 + int(level * 1000))
        gaps = [rng.expovariate(level) if plan.mode == "rate" else 0.0 for _ in items]
        if plan.mode == "rate" and gaps:
            gaps[0] = 0.0
        res = {"a": [], "b": []}
        dur = {"a": 0.0, "b": 0.0}
        blocks: dict[str, list[Block]] = {"a": [], "b": []}  # for the ratios' intervals
        label = f"{'c' if plan.mode == 'concurrency' else 'rate'}={level:g}"
        nblocks = 1
        order: list[str] = []
        if plan.schedule == "concurrent":
            self.progress.update(self.task, description=f"{label} A+B together")
            order.append("a+b")
            (ra, da), (rb, db) = await asyncio.gather(self._run_block(a, items, level, gaps),
                                                      self._run_block(b, items, level, gaps))
            res["a"], res["b"], dur["a"], dur["b"] = ra, rb, da, db
            blocks = {"a": [Block(ra, da)], "b": [Block(rb, db)]}
        else:
            # every block needs at least `level` requests, or the level's concurrency is not reached
            per = 1 if plan.mode == "rate" else int(level)
            nblocks = max(1, min(plan.blocks, len(items) // per))
            size = math.ceil(len(items) / nblocks)
            for k in range(nblocks):
                chunk = items[k * size:(k + 1) * size]
                cgaps = gaps[k * size:(k + 1) * size]
                if not chunk:
                    continue
                for name in (("a", "b") if k % 2 == 0 else ("b", "a")):
                    self.progress.update(self.task, description=f"{label} block {k + 1}/{nblocks} "
                                         f"arm {name.upper()}")
                    if plan.settle:  # let the arm that just ran go idle before this one is timed
                        await asyncio.sleep(plan.settle)
                    order.append(name)
                    r, d = await self._run_block(self.arms[name], chunk, level, cgaps)
                    res[name] += r
                    dur[name] += d
                    blocks[name].append(Block(r, d))
        sa, sb = summarize(res["a"], dur["a"]), summarize(res["b"], dur["b"])
        intervals = ratio_intervals(blocks["a"], blocks["b"], RATIO_KEYS, level=plan.confidence, seed=plan.seed)
        return {plan.mode: level, "blocks": nblocks, "order": "".join(order).upper(),
                "block_seconds": {n: [round(blk.duration, 4) for blk in bs] for n, bs in blocks.items()},
                "a": sa, "b": sb, "b_over_a": ratios(sa, sb), "b_over_a_interval": intervals}


async def scrape_vllm(client: httpx.AsyncClient, arm: Arm,
                      save_dir: Path | None = None) -> dict[str, float]:
    """The arm's vllm:* values ({} if it has none); with save_dir, keep the raw text as evidence."""
    try:
        r = await client.get(arm.url + "/metrics", timeout=5.0)
        if r.status_code != 200:
            return {}
        vals = parse_vllm_metrics(r.text)
    except (httpx.HTTPError, ValueError):
        return {}
    if save_dir is not None and vals:
        (save_dir / f"vllm-metrics-{arm.name}.txt").write_text(r.text)
    return vals


async def discover(client: httpx.AsyncClient, arm: Arm, flag: str, headers: dict[str, str]) -> None:
    """Check an arm answers /v1/models and learn its model id (unless given)."""
    try:
        r = await client.get(arm.url + "/v1/models", headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        raise HeaprError(f"{flag} {arm.url}: not reachable ({exc.__class__.__name__}: {exc}); "
                         "start the server or fix the URL") from None
    if r.status_code != 200:
        raise HeaprError(f"{flag} {arm.url}: /v1/models answered HTTP {r.status_code} "
                         f"({error_message(r.text)}); check the URL and --api-key")
    if not arm.model:
        try:
            arm.model = str(r.json()["data"][0]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise HeaprError(f"{flag} {arm.url}: /v1/models lists no model; pass --model-"
                             f"{arm.name}") from None


async def run_bench(arms: dict[str, Arm], plan: Plan, prompt_items: Optional[list[dict]],
                    headers: dict[str, str], metrics: ABMetrics, timeout: float,
                    raw_dir: Path | None = None) -> dict:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    conc_cap = int(max(plan.levels)) if plan.mode == "concurrency" else plan.max_concurrency
    limits = httpx.Limits(max_connections=2 * conc_cap + 8, max_keepalive_connections=2 * conc_cap + 8)
    tmo = httpx.Timeout(connect=10.0, read=timeout, write=30.0, pool=timeout)
    async with httpx.AsyncClient(limits=limits, timeout=tmo, trust_env=False) as client:
        for name, arm in arms.items():
            await discover(client, arm, f"--{name}", headers)
            metrics.init_arm(name, arm.model)
        print(f"bench: A={arms['a'].model} at {arms['a'].url}, B={arms['b'].model} at "
              f"{arms['b'].url}; {describe_schedule(plan)}", file=sys.stderr, flush=True)
        exact = None
        level_items: list[list[dict]] = []
        for li, _ in enumerate(plan.levels):
            if prompt_items is not None:
                items = [prompt_items[(li * plan.num_prompts + i) % len(prompt_items)]
                         for i in range(plan.num_prompts)]
            else:
                items, exact = await synthetic_prompts(client, arms["a"], plan.num_prompts,
                                                       plan.input_len, plan.seed + li)
            level_items.append(items)
        n_warm = plan.warmup + (conc_cap if plan.mode == "concurrency" else min(conc_cap, 8))
        if prompt_items is not None:
            warm_items = [prompt_items[-1 - (i % len(prompt_items))] for i in range(n_warm)]
        else:
            warm_items, _ = await synthetic_prompts(client, arms["a"], n_warm, plan.input_len,
                                                    plan.seed + 10_000)
        total = len(plan.levels) * plan.num_prompts * 2
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as progress:
            task = progress.add_task("warm-up", total=total)
            bench = Bench(arms, plan, client, headers, metrics, progress, task)
            # warm-up (not measured): a few requests one at a time, then one burst at the highest
            # concurrency, so first-request and new-batch-size costs land here; own prompts, so no
            # measured prompt finds its prefix cached
            if plan.warmup:
                burst = conc_cap if plan.mode == "concurrency" else min(conc_cap, 8)
                for name in ("a", "b"):
                    progress.update(task, description=f"warm-up arm {name.upper()}")
                    rs = [await bench._send(arms[name], item, record=False)
                          for item in warm_items[:plan.warmup]]
                    if burst > 1:
                        rs += await asyncio.gather(*(bench._send(arms[name], item, record=False)
                                                     for item in warm_items[plan.warmup:]))
                    bad = [r for r in rs if not r.ok]
                    if bad:
                        raise HeaprError(f"--{name} {arms[name].url}: warm-up request failed "
                                         f"({bad[0].error}); check the server")
            before = {n: await scrape_vllm(client, arm) for n, arm in arms.items()}
            stop = asyncio.Event()
            poller = asyncio.create_task(bench.poll_vllm(stop))
            t0 = time.time()
            levels = []
            try:
                for level, items in zip(plan.levels, level_items):
                    levels.append(await bench.run_level(level, items))
            finally:
                stop.set()
                await poller
            after = {n: await scrape_vllm(client, arm, raw_dir) for n, arm in arms.items()}
    vllm = {}
    for n in arms:
        entry = {}
        delta = {k: after[n][k] - before[n][k] for k in after[n] if k in before[n]}
        for k in ("prompt_tokens", "generation_tokens", "request_success", "preemptions"):
            if k in delta:
                entry[k + "_delta"] = delta[k]
        for k in ("ttft", "itl", "e2e"):  # the server's own view, to set against the client's
            if delta.get(k + "_count"):
                entry[f"server_{k}_ms_mean"] = 1000 * delta[k + "_sum"] / delta[k + "_count"]
        entry.update({f"peak_{k}": v for k, v in bench.vllm_peak[n].items()})
        entry["client_output_tokens"] = sum(lv[n]["output_tokens"] for lv in levels)
        vllm[n] = entry if len(entry) > 1 else {"note": "no vllm:* metrics on this server"}
    return {"started_unix": t0, "levels": levels, "vllm": vllm, "exact_input_len": exact}


def describe_schedule(plan: Plan) -> str:
    if plan.schedule == "concurrent":
        return ("concurrent: at each level both arms ran at the same time on the same prompts "
                "(they share the machine, so noise hits both alike but each slows the other)")
    return (f"alternate: at each level the prompts were split into up to {plan.blocks} blocks "
            "(at least one concurrency's worth each) run in ABBA order (A,B then B,A ...), one arm "
            "at a time, so drift and noise hit both alike")
