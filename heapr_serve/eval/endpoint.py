"""Perplexity through a served OpenAI-compatible endpoint.

It sends the very token windows the transformers path scores (token ids, not text, so no
re-tokenisation can differ) to `/v1/completions` with `echo` and `logprobs`, and reads back each prompt
token's log-probability: the same number, computed by the serving stack users run.
"""

from __future__ import annotations

import math

import torch

from heapr_serve.errors import HeaprError
from heapr_serve.eval.perplexity import eval_windows


def endpoint_base(url: str) -> str:
    """`http://host:port` from any of `host:port`, `http://host:port`, `.../v1`, `.../v1/completions`."""
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    for suffix in ("/v1/completions", "/v1"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def check_endpoint_url(url: str) -> None:
    """Refuse, before anything is loaded, an --endpoint that is not an http(s) URL with a host and port."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(endpoint_base(url))
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError:
        parts = None
    if parts is None or not parts.hostname or any(c.isspace() for c in url.strip()):
        raise HeaprError(f"--endpoint {url!r}: not a server URL; give e.g. http://127.0.0.1:8000")


def _request(method: str, url: str, endpoint: str, **kwargs):
    import httpx

    try:
        response = httpx.request(method, url, timeout=600.0, **kwargs)
    except httpx.HTTPError as err:
        raise HeaprError(f"--endpoint {endpoint}: no answer from {url} ({type(err).__name__}); start a server with `heapr-serve serve FOLDER` and pass its URL") from None
    if response.status_code != 200:
        raise HeaprError(f"--endpoint {endpoint}: {url} answered HTTP {response.status_code}: {response.text[:200]!r}")
    return response.json()


def endpoint_model_id(endpoint: str) -> str:
    """The id of the (first) model the endpoint serves, from `/v1/models`."""
    data = _request("GET", endpoint_base(endpoint) + "/v1/models", endpoint).get("data") or []
    if not data:
        raise HeaprError(f"--endpoint {endpoint}: /v1/models lists no model; is it an OpenAI-compatible completions server?")
    return data[0]["id"]


def endpoint_perplexity(endpoint: str, tokens: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
                        max_tokens: int | None = None, model: str | None = None, progress=None) -> float:
    """The same windows and NLL as `perplexity`, from the log-probabilities a served model returns for
    its prompt tokens (`/v1/completions` with echo + logprobs; the first token has none, as in
    transformers, where position 0 predicts token 1)."""
    windows = eval_windows(tokens, seq_len, max_tokens)
    model = model or endpoint_model_id(endpoint)
    url = endpoint_base(endpoint) + "/v1/completions"
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].tolist()
        body = {"model": model, "prompt": batch, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0.0}
        choices = sorted(_request("POST", url, endpoint, json=body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(batch):
            raise HeaprError(f"--endpoint {endpoint}: sent {len(batch)} prompts, got {len(choices)} choices back")
        for choice in choices:
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
            if not logprobs or len(logprobs) < seq_len:
                raise HeaprError(f"--endpoint {endpoint}: the server returned no prompt log-probabilities; it must support `echo` with `logprobs` (vLLM does)")
            nll -= sum(logprobs[1:seq_len])
            count += seq_len - 1
        if progress is not None:
            progress(len(batch))
    return math.exp(nll / count)
