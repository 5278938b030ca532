"""The benchmark's prompts: a prompt file, or synthetic prompts cut to an exact token length with
the server's own tokenizer, so both arms read the same prompts of the same length."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx

from heapr_serve.ab.arm import Arm
from heapr_serve.errors import HeaprError

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


def load_prompt_file(path: Path) -> list[dict]:
    """`.txt`: one prompt per non-empty line. `.jsonl`: {"prompt": ...} or {"messages": [...]}.
    (That the file exists, --prompts' own type checks.)"""
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
