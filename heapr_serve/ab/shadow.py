"""Shadow comparisons for ab-proxy: does the pruned arm answer like the dense one, on live traffic?

For a sampled share of generation requests (`--shadow-rate`), both arms also answer a *probe*: the same
prompt and parameters, greedy, not streamed, at most `--shadow-max-tokens` tokens, with the top-5
log-probabilities of each token. The user's request is proxied exactly as without shadowing; the
probes are extra requests of the proxy's own, run beside it, bounded by their own limit
(`--shadow-max-inflight`; over it a probe is dropped, first, and counted), never retried, and never
part of the user-facing latency metrics. They go over connections of their own (one pool per arm, of
`--shadow-max-inflight` connections), so a probe never holds one of the `--max-connections` a user's
request would wait for: what shadowing costs users is only its share of the servers' work. Greedy probes, not the user's sampled answer, because two
samples of one model differ too: only greedy outputs say whether the two arms compute the same.

Compared, the arm the request was assigned to being the primary: whether the two greedy outputs are
the same token for token; where they first differ (in tokens); and the log-likelihood gap of the
primary's tokens under the other arm: the mean absolute difference of their log-probabilities under
the two arms, over the positions where both saw the same context (the shared prefix and the first
differing token, when it is among the other arm's top 5); 0 when the arms agree exactly. Without log-probabilities (a server that does
not return them) only the texts are compared.
"""

from __future__ import annotations

import json
import random

import anyio
import httpx

TOP = 5


class Shadow:
    """The proxy's shadow comparisons: `maybe_probe` after a request is assigned."""

    def __init__(self, proxy, rate: float, max_inflight: int, max_tokens: int, seed: int | None = None) -> None:
        self.proxy, self.rate, self.max_inflight, self.max_tokens = proxy, rate, max_inflight, max_tokens
        self.rng = random.Random(None if seed is None else seed + 1)
        self.inflight = 0
        self.tasks = None  # the proxy's task group, set when it starts
        self.clients: dict[str, httpx.AsyncClient] = {}  # per arm, apart from the users' pools

    def open_clients(self, timeout: httpx.Timeout) -> None:
        limits = httpx.Limits(max_connections=self.max_inflight, max_keepalive_connections=self.max_inflight,
                              keepalive_expiry=30)
        for name, arm in self.proxy.arms.items():
            self.clients[name] = httpx.AsyncClient(base_url=arm.url, timeout=timeout, limits=limits,
                                                   follow_redirects=False, trust_env=False)

    async def close_clients(self) -> None:
        for client in self.clients.values():
            await client.aclose()
        self.clients = {}

    def maybe_probe(self, path: str, payload: dict, headers: list, primary: str) -> None:
        """Sample this request for a shadow comparison, and start it (or count it dropped)."""
        if not self.rate or self.tasks is None or not self.clients or self.rng.random() >= self.rate:
            return
        m, arm = self.proxy.metrics, self.proxy.arms[primary]
        if self.inflight >= self.max_inflight:
            m.shadow.labels(primary, arm.model, "dropped").inc()
            return
        self.inflight += 1
        self.tasks.start_soon(self._compare, path, payload, headers, primary, arm.model)

    def _probe_body(self, arm, path: str, payload: dict) -> bytes:
        body = {k: v for k, v in payload.items() if k not in ("stream", "stream_options", "n", "best_of", "seed")}
        body.update(stream=False, temperature=0, max_tokens=min(int(payload.get("max_tokens") or 16), self.max_tokens))
        if path.endswith("/chat/completions"):
            body.pop("max_completion_tokens", None)
            body.update(logprobs=True, top_logprobs=TOP)
        else:
            body.update(logprobs=TOP, echo=False)
        model = self.proxy.model_for(arm, payload.get("model"))
        if model is not None:
            body["model"] = model
        return json.dumps(body).encode()

    async def _ask(self, arm, path: str, payload: dict, headers: list) -> dict:
        r = await self.clients[arm.name].post(path, content=self._probe_body(arm, path, payload), headers=headers,
                                  timeout=httpx.Timeout(self.proxy.cfg.timeout, connect=self.proxy.cfg.connect_timeout))
        if r.status_code != 200:
            raise ValueError(f"arm {arm.name} answered {r.status_code}")
        return r.json()

    async def _compare(self, path: str, payload: dict, headers: list, primary: str, model: str) -> None:
        m = self.proxy.metrics
        answers: dict[str, dict] = {}
        failed: list[str] = []

        async def ask(name: str) -> None:
            try:
                answers[name] = await self._ask(self.proxy.arms[name], path, payload, headers)
            except (httpx.HTTPError, ValueError) as exc:  # one try, never retried
                failed.append(f"{name}: {exc}")

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, primary)
                tg.start_soon(ask, "b" if primary == "a" else "a")
        finally:
            self.inflight -= 1
        try:
            result = None if failed else compare(answers[primary], answers["b" if primary == "a" else "a"])
        except (KeyError, IndexError, TypeError, AttributeError):  # an answer not in OpenAI's shape
            result = None
        if result is None:
            m.shadow.labels(primary, model, "failed").inc()
            return
        m.shadow.labels(primary, model, "match" if result["match"] else "differ").inc()
        if self.proxy.ramp is not None:
            self.proxy.ramp.record_shadow(result["match"], result["logprob_gap"])
        if not result["match"] and result["first_diff"] is not None:
            m.shadow_first_diff.labels(primary, model).observe(result["first_diff"])
        if result["logprob_gap"] is not None:
            m.shadow_gap.labels(primary, model).observe(result["logprob_gap"])


def _tokens(answer: dict) -> tuple[list[str] | None, list[dict[str, float]] | None, str]:
    """(tokens, top log-probabilities per token, text) of a completions or chat answer."""
    choice = answer["choices"][0]
    logprobs = choice.get("logprobs")
    if "message" in choice:  # chat
        text = choice["message"].get("content") or ""
        content = (logprobs or {}).get("content")
        if not content:
            return None, None, text
        tops = [{t["token"]: t["logprob"] for t in (c.get("top_logprobs") or [])} | {c["token"]: c["logprob"]} for c in content]
        return [c["token"] for c in content], tops, text
    text = choice.get("text") or ""
    if not logprobs or not logprobs.get("tokens"):
        return None, None, text
    tops = [dict(t or {}) for t in logprobs.get("top_logprobs") or [{}] * len(logprobs["tokens"])]
    for top, token, lp in zip(tops, logprobs["tokens"], logprobs.get("token_logprobs") or []):
        if lp is not None:
            top[token] = lp
    return list(logprobs["tokens"]), tops, text


def compare(primary: dict, other: dict) -> dict:
    """Match, first differing token and log-likelihood gap of two greedy answers (module docstring)."""
    p_tokens, p_top, p_text = _tokens(primary)
    o_tokens, o_top, o_text = _tokens(other)
    if p_tokens is None or o_tokens is None:
        return {"match": p_text == o_text, "first_diff": None, "logprob_gap": None}
    first = next((i for i, (a, b) in enumerate(zip(p_tokens, o_tokens)) if a != b), min(len(p_tokens), len(o_tokens)))
    match = p_tokens == o_tokens
    gaps = []
    for i in range(min(first + 1, len(p_tokens), len(o_tokens))):  # positions whose context both arms shared
        token = p_tokens[i]
        if token in p_top[i] and token in o_top[i]:
            gaps.append(abs(p_top[i][token] - o_top[i][token]))
    return {"match": match, "first_diff": None if match else first, "logprob_gap": sum(gaps) / len(gaps) if gaps else None}
