"""One benchmark request: its streaming body, and its tokens timed as they arrive.

Every request streams, so TTFT and inter-token latency are what a user sees, not what a server logs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from heapr_serve.ab.arm import Arm
from heapr_serve.ab.metrics import StreamTimer


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


def request_body(item: dict, model: str, endpoint: str, output_len: int, ignore_eos: bool) -> dict:
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
                              error=f"HTTP {resp.status_code}: {error_message(text)}")
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


def error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            return str(err.get("message"))[:200]
        if err:
            return str(err)[:200]
    except (ValueError, AttributeError):
        pass
    return text.strip()[:200]
