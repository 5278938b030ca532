"""What the proxy accepts as a generation request body, checked before it reaches either arm.

Why check at all, when vLLM validates too: a body that one arm rejects would be counted as that arm's
`upstream_4xx` and bias the comparison, and a body that the proxy itself cannot parse (binary,
pathologically nested) must get a 400, never a 500. So the proxy parses the JSON once, bounds its
nesting, and checks the types of the OpenAI fields it or both arms rely on; everything else passes
through untouched (the arms receive the client's exact bytes unless `model` is rewritten).
"""

from __future__ import annotations

import json

MAX_DEPTH = 64  # OpenAI bodies nest a handful of levels (tool schemas a few more)


class BadRequest(Exception):
    """A body the proxy refuses: `message` is the one line the client sees with a 400."""


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(value),
                                                                          type(value).__name__)


def _depth_ok(obj: object) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return False
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return True


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _prompt_ok(p: object) -> bool:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(p, str):
        return True
    if not isinstance(p, list) or not p:
        return False
    return (all(isinstance(x, str) for x in p) or all(_is_int(x) for x in p)
            or all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p))


# field -> (check, what it must be); checked only when the field is present and not null
_FIELDS = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "max_tokens": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "max_completion_tokens": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "n": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
}


def parse_request(raw: bytes, chat: bool) -> dict:
    """The body as a dict, or BadRequest naming what is wrong."""
    if not raw.strip():
        raise BadRequest("request body is empty; send a JSON object")
    try:
        payload = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # also UnicodeDecodeError: binary bodies
        raise BadRequest(f"request body is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"request body must be a JSON object, got {_kind(payload)}")
    if not _depth_ok(payload):
        raise BadRequest(f"request body nests deeper than {MAX_DEPTH} levels")
    for name, (check, want) in _FIELDS.items():
        value = payload.get(name)
        if value is not None and not check(value):
            raise BadRequest(f"`{name}` must be {want}, got {_kind(value)}")
    if chat:
        msgs = payload.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise BadRequest("`messages` must be a non-empty array of objects "
                             f"(got {_kind(msgs) if msgs is not None else 'nothing'})")
    elif "prompt_embeds" not in payload and not _prompt_ok(payload.get("prompt")):
        got = payload.get("prompt")
        raise BadRequest("`prompt` must be a string, or a non-empty array of strings or token ids "
                         f"(got {_kind(got) if got is not None else 'nothing'})")
    return payload
