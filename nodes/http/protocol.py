"""uvicorn's HTTP protocol with two bounds a node needs against clients that hold no token.

Why our own subclass: uvicorn closes idle keep-alive connections, but not a client that connects,
finishes TLS and then sends its request headers slowly or never (slowloris). Such connections are
held before any token can be checked, so :class:`~.http.Guard` never sees them; enough of them use
up the process's file descriptors and the owner can no longer connect. Nor does it bound the size
of the headers: one client without a token pushed 1.5 GB of header lines into a node's memory in
5 s. Here each request's headers must arrive within ``HEADER_TIMEOUT_S`` and be at most
``MAX_HEADER_BYTES`` (the connection is aborted past it), and one client address may hold at most
``MAX_CONNECTIONS_PER_ADDRESS`` connections at once.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Seconds a client has to send a request's headers (its body is bounded by Guard's limits).
HEADER_TIMEOUT_S = float(os.environ.get("VOXGRID_HEADER_TIMEOUT_S", "20"))
#: Bytes of request line and headers one request may send (a bearer token and a few headers are < 2 KiB).
MAX_HEADER_BYTES = 64 * 1024
#: Connections one client address may hold open at once; a scientist's notebook uses a handful.
MAX_CONNECTIONS_PER_ADDRESS = int(os.environ.get("VOXGRID_MAX_CONNECTIONS_PER_ADDRESS", "256"))


class BoundedHttpProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` with a deadline for request headers and a per-address connection cap."""

    header_timeout_s = HEADER_TIMEOUT_S
    per_address = MAX_CONNECTIONS_PER_ADDRESS
    _open: Counter = Counter()  # per server process: every connection runs on its one event loop

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._address = self.client[0] if self.client else None
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes: int | None = 0  # None once the headers are complete
        if self._open[self._address] >= self.per_address:
            self._address = None  # not counted: refused
            self.logger.warning("refusing a connection: %d already open from one address", self.per_address)
            transport.close()
            return
        self._open[self._address] += 1
        self._start_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        self._uncount()
        super().connection_lost(exc)

    def _uncount(self) -> None:
        if self._address is not None:
            self._open[self._address] -= 1
            if self._open[self._address] <= 0:
                del self._open[self._address]
            self._address = None

    def data_received(self, data: bytes) -> None:
        if self._header_bytes is not None:
            self._header_bytes += len(data)
        super().data_received(data)  # a chunk may end the headers and carry body bytes: parse it first
        if self._header_bytes is not None and self._header_bytes > MAX_HEADER_BYTES:
            self._refuse_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._start_deadline()

    def on_headers_complete(self) -> None:
        self._header_bytes = None
        self._stop_deadline()
        super().on_headers_complete()

    def _refuse_headers(self) -> None:
        # Aborted, not closed: a TLS close waits for the peer and reads (and discards) all it still sends.
        self._stop_deadline()
        self._header_bytes = None
        self.logger.warning("aborting a connection whose request headers exceed %d bytes", MAX_HEADER_BYTES)
        self.transport.abort()

    def _start_deadline(self) -> None:
        self._stop_deadline()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:  # no request under way: nothing to answer
            self.transport.close()
