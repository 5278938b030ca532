"""`heapr-serve bench`: drive the dense (A) and pruned (B) deployments with the same prompts.

Why this shape: a pruning speed-up is only worth reporting if both arms saw the same prompts, the
same output lengths and the same machine noise. So every request streams (TTFT and inter-token
latency are then what a user sees, not what a server logs), output lengths are pinned with
`ignore_eos`, and the arms run either in ABBA-ordered blocks at each load level (default: a slow
drift or a noisy neighbour hits both arms alike, and they never compete for the machine) or
concurrently on the same prompts. The output says which. Each arm's own `vllm:*` counters and
KV-cache usage are read from its `/metrics` before, during and after, as a cross-check of the
token counts and to show memory pressure.

An arm is a URL of a running OpenAI-compatible server, or a checkpoint folder that this command
serves itself with vLLM on a free local port and stops afterwards (also on Ctrl-C or an error).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import httpx
import typer

from heapr_serve.ab.arm import Arm
from heapr_serve.ab.report import markdown_report, plot_report
from heapr_serve.ab.metrics import ABMetrics, StreamTimer, parse_vllm_metrics
from heapr_serve.ab.intervals import Block, ratio_intervals
from heapr_serve.errors import HeaprError
from heapr_serve.preflight import check_output, staged_folder
from heapr_serve.ab.local_vllm import LocalVllmServer

# Plain English words for synthetic prompts: random sequences of them do not repeat, so no prefix
# cache helps either arm, and tokenizers split them into about one token per word.
_WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education river garden window light "
    "music paper market table field letter street island forest summer winter bridge station "
    "picture voice animal doctor answer season record window energy village mountain ocean stone "
    "green quiet early simple strong little happy bright careful ready open small large new old "
    "good great high long short young important public able clear certain free whole true full"
).split()


@dataclass
class BenchArm(Arm):
    source: str = ""  # what the user gave: URL or folder
    served_here: bool = False


@dataclass
class Result:
    """One request's outcome as the client saw it."""

    ok: bool
    e2e: float
    ttft: float | None = None
    tpot: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    timed_out: bool = False  # gave up at --timeout: its latency is at least `e2e` (a censored sample)


# --- prompts ---


def load_prompt_file(path: Path) -> list[dict]:
    """`.txt`: one prompt per non-empty line. `.jsonl`: {"prompt": ...} or {"messages": [...]}."""
    if not path.is_file():
        raise HeaprError(f"--prompts {path}: no such file; give a .txt (one prompt per line) or .jsonl")
    items: list[dict] = []
    if path.suffix == ".txt":
        items = [{"prompt": line} for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise HeaprError(f"--prompts {path}: line {i} is not JSON; each line must be "
                                 '{"prompt": "..."} or {"messages": [...]}') from None
            if isinstance(obj, str):
                obj = {"prompt": obj}
            if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
                raise HeaprError(f"--prompts {path}: line {i} has neither \"prompt\" nor "
                                 "\"messages\"")
            items.append(obj)
    else:
        raise HeaprError(f"--prompts {path}: unknown extension; use .txt or .jsonl")
    if not items:
        raise HeaprError(f"--prompts {path}: no prompts in the file")
    return items


async def synthetic_prompts(client: httpx.AsyncClient, arm: Arm, n: int, input_len: int,
                            seed: int) -> tuple[list[dict], bool]:
    """n random-word prompts of `input_len` tokens, cut exactly with the server's own tokenizer
    (vLLM's /tokenize and /detokenize) when it has one, else one word per token."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(input_len + 8)) for _ in range(n)]
    exact = True
    out = []
    for text in texts:
        prompt = None
        if exact:
            try:
                r = await client.post(arm.url + "/tokenize", json={
                    "model": arm.model, "prompt": text, "add_special_tokens": False})
                r.raise_for_status()
                tokens = r.json()["tokens"][:input_len]
                r = await client.post(arm.url + "/detokenize", json={"model": arm.model,
                                                                     "tokens": tokens})
                r.raise_for_status()
                prompt = r.json()["prompt"]
            except (httpx.HTTPError, KeyError, ValueError, TypeError):
                exact = False
        if prompt is None:
            prompt = " ".join(text.split()[:input_len])
        out.append({"prompt": prompt})
    return out, exact


# --- requests ---


def _payload(item: dict, model: str, endpoint: str, output_len: int, ignore_eos: bool) -> dict:
    body: dict = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                  "temperature": 0.0, "max_tokens": int(item.get("max_tokens") or output_len)}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
    else:
        prompt = item.get("prompt")
        if prompt is None:
            prompt = "\n".join(str(m.get("content", "")) for m in item["messages"])
        body["prompt"] = prompt
    return body


async def one_request(client: httpx.AsyncClient, arm: Arm, body: dict, path: str,
                      headers: dict[str, str]) -> Result:
    """Send one streaming request and time its tokens as they arrive."""
    t0 = time.perf_counter()
    timer = StreamTimer(start=t0)
    try:
        async with client.stream("POST", arm.url + path, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return Result(False, time.perf_counter() - t0,
                              error=f"HTTP {resp.status_code}: {_error_message(text)}")
            async for chunk in resp.aiter_raw():
                timer.feed_sse(chunk)
    except httpx.HTTPError as exc:
        return Result(False, time.perf_counter() - t0, ttft=timer.first_token_s,
                      error=f"{exc.__class__.__name__}: {str(exc) or 'no detail'}"[:200],
                      timed_out=isinstance(exc, httpx.TimeoutException))
    e2e = time.perf_counter() - t0
    if timer.error or not timer.done:
        return Result(False, e2e, error=timer.error or "stream ended without [DONE]")
    return Result(True, e2e, ttft=timer.first_token_s, tpot=timer.tpot(e2e), itl=timer.gaps,
                  output_tokens=timer.output_tokens(), prompt_tokens=timer.prompt_tokens)


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            return str(err.get("message"))[:200]
        if err:
            return str(err)[:200]
    except (ValueError, AttributeError):
        pass
    return text.strip()[:200]


# --- statistics ---


def _pcts(values: list[float], scale: float = 1000.0) -> dict[str, float] | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None

    def q(p: float) -> float:
        k = (len(vals) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return (vals[lo] + (vals[hi] - vals[lo]) * (k - lo)) * scale

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(vals) / len(vals) * scale}


def summarize(results: list[Result], duration: float) -> dict:
    """Per-arm figures. Failures count in `error_rate`; a request that timed out also enters the
    latency percentiles as a censored sample at the moment it was given up (its latency is at least
    that), so an arm cannot look faster by timing out its slowest requests."""
    ok = [r for r in results if r.ok]
    timed_out = [r for r in results if r.timed_out]
    out_tokens = sum(r.output_tokens for r in ok)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "error"] = errors.get(r.error or "error", 0) + 1
    return {
        "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "error_rate": (len(results) - len(ok)) / len(results) if results else None,
        "timeouts": len(timed_out),
        "error_kinds": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "duration_s": duration,
        "ttft_ms": _pcts([r.ttft for r in ok] + [r.ttft if r.ttft is not None else r.e2e for r in timed_out]),
        "tpot_ms": _pcts([r.tpot for r in ok]),
        "itl_ms": _pcts([g for r in ok for g in r.itl]), "e2e_ms": _pcts([r.e2e for r in ok + timed_out]),
        "output_tokens": out_tokens,
        "mean_prompt_tokens": sum(prompts) / len(prompts) if prompts else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else None,
        "requests_per_s": len(ok) / duration if duration > 0 else None,
    }


# ITL's median can sit at ~0 when a loaded server delivers tokens in bursts (vLLM merges outputs a
# slow API-server loop has not sent yet), so its mean (= tokens' average spacing) is compared too.
RATIO_KEYS = [("ttft_ms", "p50"), ("ttft_ms", "p90"), ("ttft_ms", "p99"), ("tpot_ms", "p50"),
              ("tpot_ms", "p90"), ("itl_ms", "p50"), ("itl_ms", "mean"), ("itl_ms", "p99"),
              ("e2e_ms", "p50"),
              ("e2e_ms", "p90"), ("e2e_ms", "p99"), ("output_tokens_per_s", None),
              ("requests_per_s", None)]


def ratios(sa: dict, sb: dict) -> dict[str, float | None]:
    out = {}
    for key, sub in RATIO_KEYS:
        va, vb = sa.get(key), sb.get(key)
        if sub:
            va, vb = (va or {}).get(sub), (vb or {}).get(sub)
        name = f"{key}_{sub}" if sub else key
        out[name] = vb / va if va and vb is not None else None
    ea, eb = sa.get("error_rate"), sb.get("error_rate")
    # B's error rate over A's: 1.0 when neither failed; None (shown as "B only") when only B did
    out["error_rate"] = None if ea is None or eb is None else (1.0 if ea == eb == 0 else eb / ea if ea else None)
    return out


# --- the run ---


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
        body = _payload(item, arm.model, self.plan.endpoint, self.plan.output_len, self.plan.ignore_eos)
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
                         f"({_error_message(r.text)}); check the URL and --api-key")
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


# --- reports ---


def describe_schedule(plan: Plan) -> str:
    if plan.schedule == "concurrent":
        return ("concurrent: at each level both arms ran at the same time on the same prompts "
                "(they share the machine, so noise hits both alike but each slows the other)")
    return (f"alternate: at each level the prompts were split into up to {plan.blocks} blocks "
            "(at least one concurrency's worth each) run in ABBA order (A,B then B,A ...), one arm "
            "at a time, so drift and noise hit both alike")


# --- command line ---


def _parse_levels(flag: str, text: str, integer: bool) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeaprError(f"{flag} {text!r}: give comma-separated numbers, e.g. 1,4,16") from None
    if not vals or any(v <= 0 for v in vals) or (integer and any(v != int(v) for v in vals)):
        kind = "positive integers" if integer else "positive numbers"
        raise HeaprError(f"{flag} {text!r}: give comma-separated {kind}, e.g. 1,4,16")
    return vals


def _arm_source(flag: str, value: str) -> tuple[str, Optional[Path]]:
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise HeaprError(f"{flag} {value!r}: URL without a host; give e.g. http://127.0.0.1:8000")
        return value.rstrip("/"), None
    path = Path(value)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HeaprError(f"{flag} {value}: folder has no config.json; give a checkpoint folder "
                             "or a server URL")
        return "", path
    raise HeaprError(f"{flag} {value!r}: neither an http(s) URL nor a checkpoint folder")


def bench_command(
    a: str = typer.Option(..., "--a", help="Arm A (dense baseline): server URL, or checkpoint "
                          "folder to serve here with vLLM."),
    b: str = typer.Option(..., "--b", help="Arm B (pruned): server URL or checkpoint folder."),
    concurrency: str = typer.Option("1,4,16", "--concurrency", help="Comma-separated concurrency "
                                    "levels (closed loop)."),
    request_rate: Optional[str] = typer.Option(None, "--request-rate", help="Comma-separated "
                                               "request rates in req/s (Poisson arrivals); "
                                               "replaces --concurrency."),
    max_concurrency: int = typer.Option(64, "--max-concurrency", help="Cap on requests in flight "
                                        "in --request-rate mode."),
    num_prompts: int = typer.Option(32, "--num-prompts", help="Requests per arm per level."),
    input_len: int = typer.Option(128, "--input-len", help="Synthetic prompt length in tokens."),
    output_len: int = typer.Option(64, "--output-len", help="Output tokens per request."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file instead of "
                                           "synthetic prompts: .txt (one per line) or .jsonl."),
    endpoint: str = typer.Option("completions", "--endpoint", help="completions or chat."),
    schedule: str = typer.Option("alternate", "--schedule", help="alternate (ABBA blocks, one arm "
                                 "at a time) or concurrent (both arms at once)."),
    blocks: int = typer.Option(4, "--blocks", help="Blocks per level for --schedule alternate."),
    settle: float = typer.Option(2.0, "--settle", help="Idle seconds before each alternate block: a vLLM server keeps "
                                 "polling for work ~1 s after its last step, which would slow the next arm on a "
                                 "machine with few cores."),
    warmup: int = typer.Option(2, "--warmup", help="Unmeasured requests per arm first, one at a "
                               "time (then one burst at the top concurrency); 0 for none."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos", help="Pin output "
                                    "lengths (vLLM's ignore_eos) so both arms generate the same."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds per request."),
    out: Path = typer.Option(Path("runs/ab-bench"), "--out", help="Folder for results.json, "
                             "results.md, plot.png, metrics.prom and server logs."),
    model_a: Optional[str] = typer.Option(None, "--model-a", help="Model id for A (default: "
                                          "the first of its /v1/models)."),
    model_b: Optional[str] = typer.Option(None, "--model-b", help="Model id for B."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY",
                                          help="Bearer key sent to both arms."),
    server_arg: list[str] = typer.Option([], "--server-arg", help="Extra vLLM server argument "
                                         "for arms given as folders; repeat, e.g. "
                                         "--server-arg=--max-model-len=2048."),
    server_timeout: float = typer.Option(900.0, "--server-timeout", help="Seconds to wait for a "
                                         "served folder's /health."),
    kv_cache_gib: float = typer.Option(2.0, "--kv-cache-gib", help="KV cache per served folder on "
                                       "CPU (VLLM_CPU_KVCACHE_SPACE, if not set already)."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="Also serve the "
                                               "heapr_ab_* metrics on this port while running."),
    seed: int = typer.Option(0, "--seed", help="Seed for synthetic prompts and arrivals."),
    confidence: float = typer.Option(0.95, "--confidence", min=0.5, max=0.9999, help="Confidence of each level's "
                                     "B/A intervals, all of them together (a level with six ratios and 0.95 is "
                                     "wrong about one of them at most 5% of the time)."),
) -> None:
    """Benchmark dense (A) against pruned (B) on the same prompts; writes JSON, Markdown and a plot."""
    if request_rate:
        mode, levels = "rate", _parse_levels("--request-rate", request_rate, integer=False)
    else:
        mode, levels = "concurrency", _parse_levels("--concurrency", concurrency, integer=True)
    if endpoint not in ("completions", "chat"):
        raise HeaprError(f"--endpoint {endpoint!r}: use completions or chat")
    if schedule not in ("alternate", "concurrent"):
        raise HeaprError(f"--schedule {schedule!r}: use alternate or concurrent")
    for flag, v in (("--num-prompts", num_prompts), ("--input-len", input_len),
                    ("--output-len", output_len), ("--blocks", blocks),
                    ("--max-concurrency", max_concurrency)):
        if v < 1:
            raise HeaprError(f"{flag} must be at least 1, got {v}")
    if warmup < 0:
        raise HeaprError(f"--warmup must be at least 0, got {warmup}")
    if not 0 <= settle < float("inf"):
        raise HeaprError(f"--settle must be a number of seconds, 0 or more, got {settle}")
    for flag, v in (("--timeout", timeout), ("--server-timeout", server_timeout), ("--kv-cache-gib", kv_cache_gib)):
        if not v > 0 or v == float("inf"):
            raise HeaprError(f"{flag} must be a positive number, got {v}")
    url_a, dir_a = _arm_source("--a", a)
    url_b, dir_b = _arm_source("--b", b)
    prompt_items = load_prompt_file(prompts) if prompts else None
    if metrics_port is not None:
        _check_port("--metrics-port", metrics_port)
    check_output("--out", out, kind="folder", merge=True)  # written only at the end, staged
    plan = Plan(mode=mode, levels=levels, num_prompts=num_prompts, schedule=schedule,
                blocks=blocks, max_concurrency=max_concurrency, endpoint=endpoint,
                output_len=output_len, input_len=input_len, ignore_eos=ignore_eos,
                warmup=warmup, seed=seed, settle=settle, confidence=confidence)
    arms = {"a": BenchArm("a", url_a, model_a or "", source=a), "b": BenchArm("b", url_b, model_b or "", source=b)}
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    metrics = ABMetrics()

    def _terminate(signum, _frame):  # SIGTERM: unwind through the finally that stops servers
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _terminate)
    logs = Path(tempfile.mkdtemp(prefix="heapr-bench-logs-")) if dir_a or dir_b else None  # kept there if vLLM fails
    with staged_folder("--out", out, merge=True) as staging, ExitStack() as stack:
        servers = []
        for name, folder in (("a", dir_a), ("b", dir_b)):
            if folder is None:
                continue
            served = folder.resolve().name
            if name == "b" and dir_a is not None and served == dir_a.resolve().name:
                served += "-b"
            env = {} if "VLLM_CPU_KVCACHE_SPACE" in os.environ else {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib)))}
            srv = LocalVllmServer(folder, served_name=model_a if name == "a" and model_a else
                                  model_b if name == "b" and model_b else served,
                                  extra=server_arg, log=logs / f"server-{name}.log", env=env,
                                  startup_timeout=server_timeout)
            stack.callback(srv.stop)
            srv.start()
            servers.append((name, srv))
            arms[name].url, arms[name].model, arms[name].served_here = srv.url, srv.served_name, True
        for name, srv in servers:
            print(f"bench: waiting for vLLM serving {srv.folder} as arm {name.upper()} on {srv.url} "
                  f"(log: {srv.log})", file=sys.stderr, flush=True)
            srv.wait_ready()
        if metrics_port:
            from prometheus_client import start_http_server

            try:
                httpd, _ = start_http_server(metrics_port, addr="127.0.0.1",
                                             registry=metrics.registry)
            except OSError as exc:
                raise HeaprError(f"--metrics-port {metrics_port}: cannot listen ({exc.strerror}); "
                                 "pick a free port") from None
            stack.callback(httpd.server_close)
            stack.callback(httpd.shutdown)  # (callbacks run last-in first-out)
        run = asyncio.run(run_bench(arms, plan, prompt_items, headers, metrics, timeout, staging))
        stack.close()  # servers stopped: their logs are complete
        if logs is not None:
            for log in sorted(logs.iterdir()):
                shutil.move(str(log), staging / log.name)
            logs.rmdir()
        md, plotted = _write_reports(staging, arms, plan, prompts, metrics, run)
    signal.signal(signal.SIGTERM, old)
    print(md)
    plot = f"{out / 'plot.png'}, " if plotted else ""
    print(f"bench: wrote {out / 'results.json'}, {out / 'results.md'}, {plot}{out / 'metrics.prom'}"
          + ("" if plotted else " (no plot: install heapr-serve[plot] for matplotlib)"), file=sys.stderr)


def _check_port(flag: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise HeaprError(f"{flag} {port} is out of range; give 1..65535")
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise HeaprError(f"{flag} {port}: cannot listen ({exc.strerror}); pick a free port") from None


def _write_reports(folder: Path, arms, plan: Plan, prompts, metrics: ABMetrics, run: dict) -> tuple[str, bool]:
    """results.json, results.md, plot.png and metrics.prom into the staging `folder` (it becomes
    --out); returns the Markdown and whether a plot was drawn."""
    command = "heapr-serve " + " ".join(_quote(x) for x in sys.argv[1:])

    report = {
        "tool": "heapr-serve bench", "command": command, "schedule": describe_schedule(plan), "confidence": plan.confidence,
        "plan": asdict(plan),
        "arms": {n: {"source": arm.source, "url": arm.url, "model": arm.model,
                     "served_here": arm.served_here} for n, arm in arms.items()},
        "prompt_file": str(prompts) if prompts else None,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": sys.platform},
        **run,
    }
    md = markdown_report(report)
    (folder / "results.json").write_text(json.dumps(report, indent=2))
    (folder / "results.md").write_text(md)
    plotted = plot_report(report, folder / "plot.png")
    (folder / "metrics.prom").write_bytes(metrics.exposition())
    return md, plotted


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
