"""The measuring pieces shared by bench and proxy: SSE token timing and the metric exposition."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from heapr_serve.ab.metrics import OUTCOMES, ABMetrics, StreamTimer, parse_vllm_metrics


def _sse(objs: list[dict | str]) -> bytes:
    out = b""
    for o in objs:
        out += b"data: " + (o.encode() if isinstance(o, str) else json.dumps(o).encode()) + b"\n\n"
    return out


def test_stream_timer_chat_stream_split_anywhere():
    """Chunk boundaries fall mid-line; the role-only first chunk is not a token; usage counts."""
    body = _sse([
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}},
        "[DONE]",
    ])
    timer = StreamTimer(start=100.0)
    times = iter([100.0, 100.5, 101.0, 101.1, 101.3, 101.4, 101.5, 101.6, 101.7])
    for i in range(0, len(body), 37):  # 37-byte pieces: every event is split somewhere
        timer.feed_sse(body[i:i + 37], now=next(times, 102.0))
    assert timer.done and timer.error is None
    assert timer.events == 3 and timer.output_tokens() == 3 and timer.prompt_tokens == 7
    assert timer.first_token_s is not None and timer.first_token_s > 0
    assert len(timer.gaps) == 2 and all(g >= 0 for g in timer.gaps)
    assert timer.tpot() == (timer.last_token_s() - timer.first_token_s) / 2
    assert timer.tpot(e2e_s=2.0) == (2.0 - timer.first_token_s) / 2  # up to the end of the stream


def test_stream_timer_completions_error_event_and_no_usage():
    timer = StreamTimer(start=0.0)
    timer.feed_sse(_sse([{"choices": [{"index": 0, "text": "a"}]}]), now=0.2)
    timer.feed_sse(_sse([{"choices": [{"index": 0, "text": "b"}]}]), now=0.3)
    timer.feed_sse(_sse([{"error": {"message": "arm b broke the stream", "code": 502}}]), now=0.4)
    assert timer.error == "arm b broke the stream" and not timer.done
    assert timer.output_tokens() == 2  # no usage block: one token per text event
    assert abs(timer.first_token_s - 0.2) < 1e-9 and abs(timer.gaps[0] - 0.1) < 1e-9


def test_stream_timer_non_streaming_body():
    timer = StreamTimer(start=0.0)
    body = json.dumps({"choices": [{"text": "x y z"}],
                       "usage": {"prompt_tokens": 4, "completion_tokens": 3}}).encode()
    timer.feed_body(body[:10])
    timer.feed_body(body[10:])
    timer.finish_body()
    assert timer.output_tokens() == 3 and timer.prompt_tokens == 4 and timer.first_token_s is None


def test_exposition_has_every_family_per_arm_and_model():
    m = ABMetrics()
    m.init_arm("a", "dense")
    m.init_arm("b", "pruned")
    timer = StreamTimer(start=0.0)
    timer.feed_sse(_sse([{"choices": [{"text": "t"}]}]) * 3, now=0.05)
    m.observe("b", "pruned", timer, 0.2)
    m.requests.labels("b", "pruned", "ok", "b").inc()
    fams = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    for name in ("heapr_ab_requests", "heapr_ab_assigned", "heapr_ab_ttft_seconds",
                 "heapr_ab_itl_seconds", "heapr_ab_tpot_seconds", "heapr_ab_e2e_latency_seconds",
                 "heapr_ab_output_tokens", "heapr_ab_prompt_tokens", "heapr_ab_in_flight",
                 "heapr_ab_upstream_up"):
        assert name in fams, name
    req = [s for s in fams["heapr_ab_requests"].samples if s.name == "heapr_ab_requests_total"]
    assert len(req) == 2 * len(OUTCOMES)  # every (arm, outcome) exists from the start, at 0
    e2e = {(s.labels["arm"], s.labels["model"]): s.value
           for s in fams["heapr_ab_e2e_latency_seconds"].samples if s.name.endswith("_count")}
    assert e2e == {("a", "dense"): 0.0, ("b", "pruned"): 1.0}
    assert not any(s.name.endswith("_created") for f in fams.values() for s in f.samples)


def test_parse_vllm_metrics_sums_counters_and_takes_max_of_gauges():
    # The text shape vLLM 0.32 serves: counters per engine and model, a KV-cache gauge per engine.
    text = "\n".join([
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        'vllm:generation_tokens_total{engine="0",model_name="m"} 120.0',
        'vllm:generation_tokens_total{engine="1",model_name="m"} 30.0',
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 512.0',
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25',
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5',
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 10.0',
        "",
    ])
    vals = parse_vllm_metrics(text)
    assert vals == {"generation_tokens": 150.0, "prompt_tokens": 512.0, "kv_cache_usage": 0.5}
    assert parse_vllm_metrics("# nothing here\n") == {}


def test_parse_vllm_metrics_on_a_real_vllm_exposition():
    """tests/test_ab_vllm_metrics.txt: the vllm:* lines of a real vLLM 0.32 CPU server's /metrics
    after 38 requests of 32 tokens (histogram bucket lines dropped to keep the file small)."""
    text = (Path(__file__).parent / "test_ab_vllm_metrics.txt").read_text()
    vals = parse_vllm_metrics(text)
    assert vals["generation_tokens"] == 1216.0 and vals["prompt_tokens"] == 2432.0
    assert vals["request_success"] == 38.0 and vals["preemptions"] == 0.0
    assert vals["kv_cache_usage"] == 0.0 and vals["requests_running"] == 0.0
    assert vals["ttft_count"] == vals["e2e_count"] == 38.0
    assert vals["itl_count"] == 1216.0 - 38.0  # one gap per token after the first
    assert 0 < vals["itl_sum"] / vals["itl_count"] < 1.0
