"""What the A/B side measures, in one place, so the benchmark and the proxy report the same things.

Three pieces:

- `ABMetrics`: the `heapr_ab_*` Prometheus histograms, counters and gauges, labelled by arm and
  model, on a registry of their own (so a test or a bench run never sees another run's samples).
- `StreamTimer`: reads an OpenAI server-sent-event stream as its bytes go by and records when each
  token-bearing event arrived, which gives TTFT, inter-token latency and TPOT without buffering
  the response. The proxy feeds it the exact chunks it forwards; the benchmark the chunks it reads.
- `parse_vllm_metrics`: the handful of `vllm:*` values (token counters, KV-cache usage, queue
  lengths) that a vLLM server exposes on its own `/metrics`, for the benchmark summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.parser import text_string_to_metric_families

# The *_created series double the exposition and no A/B query uses them.
disable_created_metrics()

ARMS = ("a", "b")

# Latency buckets (seconds). TTFT and end-to-end span a CPU server under load (tens of seconds);
# inter-token latency is milliseconds on a GPU, a few hundred on a small CPU box.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5,
                7.5, 10, 15, 20, 30, 60, 120)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20,
               30, 45, 60, 90, 120, 180, 300)
# The proxy's own queueing: sub-millisecond when a connection is free, seconds when a pool is full.
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5)

SHADOW_POSITION_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SHADOW_GAP_BUCKETS = (0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10)  # (no negative bound: it would hide _sum)

# Outcomes of one request, as counted in heapr_ab_requests_total. Every request the proxy accepts
# (or the benchmark sends) is counted exactly once, so the counters add up to the traffic.
OUTCOMES = ("ok", "upstream_4xx", "upstream_5xx", "unavailable", "timeout", "stream_error",
            "client_cancelled")


class ABMetrics:
    """The heapr_ab_* families on their own registry; `model` is the model id an arm serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        lab = ("arm", "model")
        self.requests = Counter("heapr_ab_requests", "Requests finished, by the arm that served them "
                                "(or was assigned, when none could), outcome, and the arm the split "
                                "assigned (another one when the request failed over).",
                                (*lab, "outcome", "assigned"), registry=r)
        self.assigned = Counter("heapr_ab_assigned", "Requests assigned to each arm by the traffic split "
                                "(before any failover).", lab, registry=r)
        self.failovers = Counter("heapr_ab_failovers", "Requests moved from one arm to the other.",
                                 ("from_arm", "to_arm", "reason"), registry=r)
        self.rejected = Counter("heapr_ab_rejected", "Requests refused by the proxy itself before "
                                "reaching an arm.", ("reason",), registry=r)
        self.queue_wait = Histogram(
            "heapr_ab_queue_wait_seconds", "Time from the proxy receiving a request to sending it to "
            "the arm (waiting for a connection of the arm's pool, connecting); not part of TTFT or "
            "end-to-end latency, which start when the request is sent.", lab,
            buckets=QUEUE_BUCKETS, registry=r)
        self.ttft = Histogram("heapr_ab_ttft_seconds", "Time to first token (streaming requests), "
                              "from sending the request to the arm.",
                              lab, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("heapr_ab_itl_seconds", "Inter-token latency: gap between successive "
                             "token-bearing stream events.", lab, buckets=TOKEN_BUCKETS, registry=r)
        self.tpot = Histogram("heapr_ab_tpot_seconds", "Time per output token after the first, per "
                              "request.", lab, buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("heapr_ab_e2e_latency_seconds", "End-to-end latency of successful "
                             "requests, from sending the request to the arm to its last byte; a timed-out "
                             "one at the moment it was given up (censored: at least that).", lab,
                             buckets=E2E_BUCKETS, registry=r)
        self.output_tokens = Counter("heapr_ab_output_tokens", "Output tokens of successful requests.",
                                     lab, registry=r)
        self.prompt_tokens = Counter("heapr_ab_prompt_tokens", "Prompt tokens of successful requests "
                                     "(when the server reports usage).", lab, registry=r)
        self.in_flight = Gauge("heapr_ab_in_flight", "Requests in flight to each arm.", lab, registry=r)
        self.up = Gauge("heapr_ab_upstream_up", "1 when the arm's /health answered at the last check.",
                        lab, registry=r)
        # the guarded ramp (heapr_serve.ab.ramp)
        self.ramp_share = Gauge("heapr_ab_ramp_share", "B's share of the traffic the ramp sets now (0 after a rollback).", registry=r)
        self.ramp_step = Gauge("heapr_ab_ramp_step", "The ramp's current step (0-based index into --ramp).", registry=r)
        self.ramp_state = Gauge("heapr_ab_ramp_state", "1 for the ramp's state: ramping, complete or rolled_back.",
                                ("state",), registry=r)
        # shadow comparisons (heapr_serve.ab.shadow), labelled by the primary arm (the one assigned)
        self.shadow = Counter("heapr_ab_shadow", "Shadow comparisons of both arms' greedy answers to one request: "
                              "match, differ, failed (an arm did not answer), dropped (over --shadow-max-inflight).",
                              (*lab, "result"), registry=r)
        self.shadow_first_diff = Histogram("heapr_ab_shadow_first_diff_tokens", "Token position where the two "
                                           "arms' greedy answers first differ (differing pairs only).", lab,
                                           buckets=SHADOW_POSITION_BUCKETS, registry=r)
        self.shadow_gap = Histogram("heapr_ab_shadow_logprob_gap", "Log-likelihood gap of the primary's greedy "
                                    "answer under the other arm: mean |log-prob difference| per token over their shared context.", lab,
                                    buckets=SHADOW_GAP_BUCKETS, registry=r)

    def init_arm(self, arm: str, model: str) -> None:
        """Create every series of an arm at zero, so Prometheus's rate() sees the first requests."""
        for fam in (self.assigned, self.queue_wait, self.ttft, self.itl, self.tpot, self.e2e, self.output_tokens,
                    self.prompt_tokens, self.in_flight, self.up, self.shadow_first_diff, self.shadow_gap):
            fam.labels(arm, model)
        for outcome in OUTCOMES:
            self.requests.labels(arm, model, outcome, arm)
        for result in ("match", "differ", "failed", "dropped"):
            self.shadow.labels(arm, model, result)

    def observe_timeout(self, arm: str, model: str, timer: "StreamTimer | None", waited_s: float) -> None:
        """A request given up after `waited_s` from being sent: a censored sample of end-to-end latency
        (and of TTFT when no token came), so an arm that times out its slowest requests does not look
        faster than one that answers them slowly."""
        self.e2e.labels(arm, model).observe(waited_s)
        first = timer.first_token_s if timer is not None else None
        self.ttft.labels(arm, model).observe(waited_s if first is None else first)

    def observe(self, arm: str, model: str, timer: "StreamTimer", e2e_s: float) -> None:
        """Record one successful request's latencies and tokens."""
        self.e2e.labels(arm, model).observe(e2e_s)
        if timer.first_token_s is not None:
            self.ttft.labels(arm, model).observe(timer.first_token_s)
            itl = self.itl.labels(arm, model)
            for gap in timer.gaps:
                itl.observe(gap)
            tpot = timer.tpot(e2e_s)
            if tpot is not None:
                self.tpot.labels(arm, model).observe(tpot)
        out = timer.output_tokens()
        if out:
            self.output_tokens.labels(arm, model).inc(out)
        if timer.prompt_tokens:
            self.prompt_tokens.labels(arm, model).inc(timer.prompt_tokens)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (what /metrics serves)."""
        return generate_latest(self.registry)


@dataclass
class StreamTimer:
    """Token timing of one OpenAI response, fed chunk by chunk as it is received.

    A "token event" is a server-sent event whose choices carry text (completions `text`, chat
    `delta.content` or `delta.reasoning_content`); vLLM sends one per engine step, usually one
    token. The final usage block (stream_options.include_usage, or the body of a non-streaming
    response) gives exact token counts when the server sends it.
    """

    start: float
    first_token_s: float | None = None
    gaps: list[float] = field(default_factory=list)
    events: int = 0
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None
    done: bool = False  # saw `data: [DONE]`
    _last: float | None = None
    _buf: bytes = b""
    _body: bytearray = field(default_factory=bytearray)
    _keep_gaps: bool = True

    MAX_LINE = 1 << 20  # a stream line longer than this is dropped, not held

    def feed_sse(self, chunk: bytes, now: float | None = None) -> None:
        """Consume a piece of an SSE body; complete `data:` lines are inspected, the rest held."""
        now = time.perf_counter() if now is None else now
        buf = self._buf + chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1:]
            if line.startswith(b"data:"):
                self._event(line[5:].strip(), now)
        self._buf = buf if len(buf) <= self.MAX_LINE else b""

    def feed_body(self, chunk: bytes) -> None:
        """Consume a piece of a non-streaming JSON body (kept only up to MAX_LINE, for its usage)."""
        if len(self._body) + len(chunk) <= self.MAX_LINE:
            self._body += chunk

    def finish_body(self) -> None:
        """Parse the non-streaming body kept by feed_body for its usage block."""
        try:
            obj = json.loads(bytes(self._body))
        except ValueError:
            return
        if isinstance(obj, dict):
            self._usage(obj.get("usage"))
            if self.completion_tokens is None:
                self.events = sum(1 for c in obj.get("choices") or () if isinstance(c, dict))

    def _event(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        if not payload:
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj:
            err = obj["error"]
            self.error = (err.get("message") if isinstance(err, dict) else str(err)) or "error event"
        self._usage(obj.get("usage"))
        if _has_text(obj.get("choices")):
            self.events += 1
            if self._last is None:
                self.first_token_s = now - self.start
            elif self._keep_gaps:
                self.gaps.append(now - self._last)
            self._last = now

    def _usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                self.completion_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]

    def output_tokens(self) -> int:
        """Tokens generated: the server's count when it sent usage, else one per token event."""
        return self.completion_tokens if self.completion_tokens is not None else self.events

    def last_token_s(self) -> float | None:
        return None if self._last is None else self._last - self.start

    def tpot(self, e2e_s: float | None = None) -> float | None:
        """Mean time per output token after the first: (end-to-end - TTFT) / (tokens - 1), as
        vLLM's serving benchmark defines it; without e2e_s, up to the last token event."""
        n = self.output_tokens()
        if self.first_token_s is None or self._last is None or n < 2:
            return None
        end = e2e_s if e2e_s is not None else self._last - self.start
        return (end - self.first_token_s) / (n - 1)


def _has_text(choices: object) -> bool:
    if not isinstance(choices, list):
        return False
    for c in choices:
        if not isinstance(c, dict):
            continue
        if c.get("text"):
            return True
        delta = c.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")
                                        or delta.get("reasoning")):
            return True
    return False


# The vLLM values the A/B summary reads from a server's /metrics: counters are summed over their
# label sets (engines, model names), gauges take the maximum.
VLLM_COUNTERS = {
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "request_success": "vllm:request_success_total",
    "preemptions": "vllm:num_preemptions_total",
    # the server's own latency histograms (sum and count give its mean over a run)
    "ttft_sum": "vllm:time_to_first_token_seconds_sum",
    "ttft_count": "vllm:time_to_first_token_seconds_count",
    "itl_sum": "vllm:inter_token_latency_seconds_sum",
    "itl_count": "vllm:inter_token_latency_seconds_count",
    "e2e_sum": "vllm:e2e_request_latency_seconds_sum",
    "e2e_count": "vllm:e2e_request_latency_seconds_count",
}
VLLM_GAUGES = {
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
    "requests_running": "vllm:num_requests_running",
    "requests_waiting": "vllm:num_requests_waiting",
}


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """Pick the vLLM counters and gauges above out of a Prometheus text exposition.

    Returns only the values present; an empty dict means the server exposes none (not vLLM, or
    metrics disabled). A malformed exposition raises ValueError.
    """
    sums: dict[str, float] = {}
    maxes: dict[str, float] = {}
    wanted_c = {v: k for k, v in VLLM_COUNTERS.items()}
    wanted_g = {v: k for k, v in VLLM_GAUGES.items()}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("vllm:"):
            continue
        for s in fam.samples:
            if s.name in wanted_c:
                key = wanted_c[s.name]
                sums[key] = sums.get(key, 0.0) + s.value
            elif s.name in wanted_g:
                key = wanted_g[s.name]
                maxes[key] = max(maxes.get(key, float("-inf")), s.value)
    return {**sums, **maxes}


def read_counter_sum(text: str, name: str, **match: str) -> float:
    """Sum of a family's samples whose labels include `match` (for tests and summaries)."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                total += s.value
    return total
