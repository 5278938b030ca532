"""What ab-proxy says on the wire: its own headers, the statuses it may fail over on, OpenAI-shaped
error bodies and short reasons for upstream failures (shared by the app, the exchange and the
HTTP server)."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

PROXY_KEY_HEADER = "x-heapr-proxy-key"
ARM_HEADER = "x-heapr-arm"  # added to every proxied response: which arm answered
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
              "accept-encoding", PROXY_KEY_HEADER, ARM_HEADER}
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_HEAD_BYTES = 16 * 1024  # a request's headers; what uvicorn (and so vLLM) takes by default


def _error(status: int, message: str, kind: str) -> JSONResponse:
    """An error body in OpenAI's shape, so SDK clients show the message."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def _error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def _describe(exc: BaseException) -> str:
    """Short reason for an upstream failure, e.g. 'ConnectError: connection refused'."""
    text = str(exc).strip() or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:200]
