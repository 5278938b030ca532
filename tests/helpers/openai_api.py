"""What every served folder must answer: the OpenAI-compatible routes a client uses, and vLLM's metrics."""

from __future__ import annotations

from pathlib import Path

import httpx


def check_openai_api(base: str, name: str, folder: Path) -> None:
    """/v1/models lists `name`; a completion and a chat completion come back; /metrics is vLLM's."""
    models = httpx.get(f"{base}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [name]
    comp = httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": "The capital of France is",
                                                      "max_tokens": 6, "temperature": 0}, timeout=120).json()
    assert comp["usage"]["completion_tokens"] == 6 and isinstance(comp["choices"][0]["text"], str)
    assert (Path(folder) / "chat_template.jinja").is_file() or "chat_template" in (Path(folder) / "tokenizer_config.json").read_text()
    chat = httpx.post(f"{base}/v1/chat/completions", json={
        "model": name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0,
    }, timeout=120).json()
    assert chat["choices"][0]["message"]["role"] == "assistant", chat
    assert chat["usage"]["completion_tokens"] >= 1
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    assert "vllm:generation_tokens" in metrics and "vllm:request_success" in metrics
