"""The proxy's own HTTP server: uvicorn, hardened against clients that hold connections.

Why its own module: the proxy faces whatever production traffic sends. uvicorn bounds the size of a
request head that arrives in pieces (h11's incomplete-event limit: a larger one gets a 400 and the
connection closes; the proxy app answers 431 to one that came whole) but
not the time a client may take to send it, so a client that dribbles a header a byte at a time
would hold its connection forever. Here the h11 protocol closes a connection that has not sent a
complete request head within `client_timeout` seconds (on a fresh connection, and between
keep-alive requests); the proxy app bounds the body and every response write by the same time.
The command and the tests start the proxy through `server_config`, so both run the same server.
"""

from __future__ import annotations

import contextlib

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from heapr_serve.ab.wire import MAX_HEAD_BYTES



def h11_protocol(client_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request head is not complete in time."""

    class HeadTimeoutH11(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            # armed before the parent handles pipelined requests: one that starts a new cycle
            # there disarms it (the timer only fires while self.cycle is still this one)
            self._arm_head_timer()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(client_timeout, self._head_timeout, self.cycle)

        def _head_timeout(self, cycle) -> None:
            if self.cycle is not cycle or self.transport.is_closing():
                return  # a request head arrived meanwhile, or the connection is gone
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    return HeadTimeoutH11


def server_config(app, host: str, port: int, client_timeout: float, **kw) -> uvicorn.Config:
    """The uvicorn configuration the proxy runs under (also in the tests)."""
    return uvicorn.Config(app, host=host, port=port, http=h11_protocol(client_timeout), ws="none",
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES, log_level="warning",
                          access_log=False, server_header=False, date_header=False,
                          lifespan="on", **kw)
