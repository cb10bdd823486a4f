"""The grid's relay: scientists reach nodes that listen on nothing, over the nodes' own outbound links.

Why bytes and not messages: the scientist's TLS session still ends at the node. A scientist asks the
grid for a tunnel with an ordinary HTTP ``CONNECT host:port`` (httpx's proxy support), where the
authority is the node's registered URL; the grid asks that node, over the control link the node
dialled (``GET /v1/relay/listen``, upgraded), to dial back once more for this tunnel
(``POST /v1/relay/attach/<id>``, upgraded); then it splices the two connections. What the grid
carries is the scientist's TLS session with the node, checked against the federation CA and the
node's host name exactly as in direct mode, so the grid learns node names, timing and sizes, and can
neither read nor alter, replay or forge what passes, nor pose as a node (it has no node key).

Both kinds of request arrive on the grid's one HTTPS port: :class:`RelayHttpProtocol` looks at the
first request line of a connection and hands relay requests to :class:`Relay`; everything else goes
to the grid's FastAPI app as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

from voxgrid.nodes.http.protocol import MAX_HEADER_BYTES, BoundedHttpProtocol

log = logging.getLogger("voxgrid.relay")

LISTEN_PATH = "/v1/relay/listen"
ATTACH_PATH = "/v1/relay/attach/"
UPGRADE = "voxgrid-relay/1"
#: Seconds a node has to dial back for a tunnel a scientist asked for.
ATTACH_TIMEOUT_S = 15.0
#: Seconds between the grid's pings on a control link; a link silent for 3 of them is dropped.
PING_S = 20.0
#: Tunnels one scientist may hold open at once (a notebook's connection pool uses a handful per node).
MAX_TUNNELS_PER_CALLER = 64
#: Bytes of one control line (a ping or a pong is < 100).
MAX_CONTROL_LINE = 4096
_PREFIXES = (b"CONNECT ", f"GET {LISTEN_PATH}".encode(), f"POST {ATTACH_PATH}".encode())
_SNIFF = max(len(p) for p in _PREFIXES)

# Per tunnel, (direction "up"/"down", bytes) -> bytes: only tests of a hostile relay (tests/hostile_relay.py) set one.
Tamper = Callable[[str, bytes], bytes]


class RelayRefused(Exception):
    """A relay request refused with an HTTP status and a reason the caller sees."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(f"{title} ({status}): {detail}")
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}


@dataclass
class LinkStats:
    """What the grid operator sees of one node's link: no content, only timing and sizes."""

    node: str
    peer: str
    connected_since: float = field(default_factory=time.time)
    last_traffic: float = field(default_factory=time.time)
    tunnels_open: int = 0
    tunnels_total: int = 0
    bytes_up: int = 0  # scientist -> node
    bytes_down: int = 0  # node -> scientist

    def touch(self, up: int = 0, down: int = 0) -> None:
        self.last_traffic = time.time()
        self.bytes_up += up
        self.bytes_down += down


class Splice(asyncio.Protocol):
    """One end of a tunnel: what arrives here is written to the other end, with back-pressure both ways."""

    def __init__(self, transport: asyncio.BaseTransport, direction: str, stats: LinkStats,
                 on_close: Callable[[], None], tamper: Tamper | None = None):
        self.transport, self.direction, self.stats, self.on_close, self.tamper = (
            transport, direction, stats, on_close, tamper)
        self.peer: Splice | None = None
        self._early = bytearray()  # bytes that arrived before the other end was attached

    def attach(self, peer: Splice) -> None:
        self.peer = peer
        if self._early:
            self.data_received(bytes(self._early))
            self._early.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self._early += data
            if len(self._early) > MAX_HEADER_BYTES:
                self.transport.abort()
            return
        if self.tamper is not None:
            data = self.tamper(self.direction, data)
        self.stats.touch(**{self.direction: len(data)})
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
            return True
        return False

    # The peer's write buffer is full: stop reading here until it drains (so memory stays bounded).
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.close()
        self.on_close()


class Control(asyncio.Protocol):
    """The grid's end of a node's control link: newline-delimited JSON, pings both ways."""

    def __init__(self, relay: Relay, transport: asyncio.Transport, stats: LinkStats, on_close: Callable[[], None]):
        self.relay, self.transport, self.stats, self.on_close = relay, transport, stats, on_close
        self._buffer = bytearray()

    def send(self, message: dict) -> None:
        self.transport.write(json.dumps(message).encode() + b"\n")

    def data_received(self, data: bytes) -> None:
        self.stats.last_traffic = time.time()
        self._buffer += data
        while b"\n" in self._buffer:
            line, _, rest = bytes(self._buffer).partition(b"\n")
            self._buffer = bytearray(rest)
            self._message(line)
        if len(self._buffer) > MAX_CONTROL_LINE:
            self._drop(f"a control line longer than {MAX_CONTROL_LINE} bytes")

    def _message(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict) or not ({"ping", "pong"} & message.keys()):
            self._drop(f"a control line that is not a ping or a pong: {line[:80]!r}")
        elif "ping" in message:
            self.send({"pong": message["ping"]})

    def _drop(self, why: str) -> None:
        log.warning("closing the control link of node %s: it sent %s", self.stats.node, why)
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_close()


@dataclass
class Pending:
    node: str
    caller: str
    attached: asyncio.Future


class Relay:
    """Node links and tunnels of one grid process; all of it runs on the server's event loop.

    ``authenticate(token) -> (name, role)`` checks grid tokens; ``node_for(authority)`` names the node
    registered at ``host:port`` (None when none is)."""

    def __init__(self, authenticate: Callable, node_for: Callable[[str], str | None],
                 tamper: Callable[[], Tamper] | None = None):
        self.authenticate, self.node_for, self.tamper = authenticate, node_for, tamper
        self.links: dict[str, tuple[Control, LinkStats]] = {}
        self.pending: dict[str, Pending] = {}
        self.tunnels = Counter()  # per scientist
        self._pinger: asyncio.Task | None = None
        self._transports: set[asyncio.Transport] = set()

    def opened(self, transport: asyncio.Transport) -> None:
        """Track a connection taken from uvicorn, so :meth:`close` can end it; forgotten once closed."""
        self._transports = {t for t in self._transports if not t.is_closing()}
        self._transports.add(transport)

    def close(self) -> None:
        """End every link and tunnel (the grid is shutting down)."""
        for transport in self._transports:
            transport.abort()
        self._transports.clear()
        if self._pinger is not None:
            self._pinger.cancel()

    def status(self) -> list[LinkStats]:
        return [stats for _, stats in sorted(self.links.values(), key=lambda link: link[1].node)]

    async def handle(self, protocol: RelayHttpProtocol, request: h11.Request, rest: bytes) -> None:
        """Serve one relay request whose head ``request`` arrived on ``protocol``'s connection."""
        transport = protocol.transport
        try:
            target = request.target.decode("latin-1")
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
            if request.method == b"CONNECT":
                await self._connect(protocol, target, headers, rest)
            elif request.method == b"GET" and target == LISTEN_PATH:
                self._listen(protocol, headers)
            elif request.method == b"POST" and target.startswith(ATTACH_PATH):
                self._attach(protocol, target[len(ATTACH_PATH):], headers, rest)
            else:
                raise RelayRefused(404, "Not Found", f"no relay route {request.method.decode()} {target}")
        except RelayRefused as exc:
            _answer(transport, exc.status, exc.title, exc.detail, exc.headers)
            transport.close()

    def _caller(self, headers: dict, header: str, *roles: str) -> tuple[str, str]:
        value = headers.get(header, "")
        scheme, _, token = value.partition(" ")
        who = self.authenticate(token.strip() or None) if scheme.lower() == "bearer" else None
        if who is None:
            status = 407 if header == "proxy-authorization" else 401
            raise RelayRefused(status, "Unauthorized", f"a valid grid token is needed in the {header} header "
                               "(Bearer)", {"Proxy-Authenticate" if status == 407 else "WWW-Authenticate": "Bearer"})
        if who[1] not in roles:
            raise RelayRefused(403, "Forbidden", f"{who[1]} {who[0]!r} may not do this; it needs the role "
                               f"{' or '.join(roles)}")
        return who

    def _listen(self, protocol: RelayHttpProtocol, headers: dict) -> None:
        name, _ = self._caller(headers, "authorization", "node")
        _need_upgrade(headers)
        old = self.links.pop(name, None)
        if old is not None:  # the node reconnected: its old link is half-open or about to be
            old[0].transport.abort()
        transport = protocol.take_over()
        stats = LinkStats(node=name, peer=protocol.peer())
        _switch(transport)
        control = Control(self, transport, stats, lambda: self._forget(name, stats))
        transport.set_protocol(control)
        self.links[name] = (control, stats)
        self._start_pinger()
        log.info("node %s connected from %s", name, stats.peer)

    def _forget(self, name: str, stats: LinkStats) -> None:
        link = self.links.get(name)
        if link is not None and link[1] is stats:
            del self.links[name]
            log.info("node %s disconnected", name)

    async def _connect(self, protocol: RelayHttpProtocol, authority: str, headers: dict, rest: bytes) -> None:
        caller, _ = self._caller(headers, "proxy-authorization", "scientist", "owner")
        node = self.node_for(authority)
        if node is None:
            raise RelayRefused(404, "Not Found", f"no node is registered at {authority}")
        link = self.links.get(node)
        if link is None:
            raise RelayRefused(502, "Bad Gateway", f"node {node} is not connected to the grid now; it dials "
                               "out and will be reachable again when it reconnects")
        if self.tunnels[caller] >= MAX_TUNNELS_PER_CALLER:
            raise RelayRefused(429, "Too Many Requests", f"{caller} already holds {MAX_TUNNELS_PER_CALLER} "
                               "tunnels; close some connections first", {"Retry-After": "1"})
        tunnel = secrets.token_urlsafe(16)
        pending = Pending(node, caller, asyncio.get_running_loop().create_future())
        self.pending[tunnel] = pending
        self.tunnels[caller] += 1
        transport = protocol.take_over()
        try:
            link[0].send({"open": tunnel})
            node_end = await asyncio.wait_for(asyncio.shield(pending.attached), ATTACH_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._release(caller)
            _answer(transport, 504, "Gateway Timeout", f"node {node} did not answer within {ATTACH_TIMEOUT_S:g} s")
            transport.close()
            return
        finally:
            self.pending.pop(tunnel, None)
        transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self._splice(transport, node_end, link[1], caller, rest)

    def _attach(self, protocol: RelayHttpProtocol, tunnel: str, headers: dict, rest: bytes) -> None:
        name, _ = self._caller(headers, "authorization", "node")
        _need_upgrade(headers)
        pending = self.pending.get(tunnel)
        if pending is None or pending.attached.done():
            raise RelayRefused(404, "Not Found", "no tunnel is waiting under that id (it timed out or was taken)")
        if pending.node != name:
            raise RelayRefused(403, "Forbidden", f"node {name!r} cannot take a tunnel meant for {pending.node!r}")
        transport = protocol.take_over()
        _switch(transport)
        pending.attached.set_result((transport, rest))

    def _splice(self, scientist: asyncio.Transport, node_end: tuple, stats: LinkStats, caller: str,
                early: bytes) -> None:
        node, node_early = node_end
        stats.tunnels_open += 1
        stats.tunnels_total += 1
        closed = []

        def on_close():
            closed.append(1)
            if len(closed) == 2:
                stats.tunnels_open -= 1
                self._release(caller)

        tamper = self.tamper() if self.tamper is not None else None
        up = Splice(scientist, "up", stats, on_close, tamper)
        down = Splice(node, "down", stats, on_close, tamper)
        scientist.set_protocol(up)
        node.set_protocol(down)
        up.attach(down)
        down.attach(up)
        if early:
            up.data_received(early)
        if node_early:
            down.data_received(node_early)

    def _release(self, caller: str) -> None:
        self.tunnels[caller] -= 1
        if self.tunnels[caller] <= 0:
            del self.tunnels[caller]

    def _start_pinger(self) -> None:
        if self._pinger is None or self._pinger.done():
            self._pinger = asyncio.get_running_loop().create_task(self._ping_forever())

    async def _ping_forever(self) -> None:
        while self.links:
            await asyncio.sleep(PING_S)
            now = time.time()
            for control, stats in list(self.links.values()):
                if now - stats.last_traffic > 3 * PING_S:
                    log.warning("node %s silent for %.0f s: dropping its link", stats.node, now - stats.last_traffic)
                    control.transport.abort()
                else:
                    control.send({"ping": now})


def _need_upgrade(headers: dict) -> None:
    if headers.get("upgrade", "").lower() != UPGRADE:
        raise RelayRefused(400, "Bad Request", f"a relay link needs 'Upgrade: {UPGRADE}'")


def _switch(transport: asyncio.Transport) -> None:
    transport.write(f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE}\r\n\r\n".encode())


def _answer(transport: asyncio.Transport, status: int, title: str, detail: str,
            headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {title}", "Content-Type: application/problem+json",
            f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)


class RelayHttpProtocol(BoundedHttpProtocol):
    """The grid's HTTP protocol: a connection whose first request is a relay request goes to ``relay``."""

    relay: Relay  # set on a subclass per server (see :func:`relay_protocol`)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._sniffing: bytearray | None = bytearray()
        self._relay_head: bytearray | None = None
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._relay_head is not None:
            return self._read_relay_head(data)
        if self._sniffing is None:
            return super().data_received(data)
        self._sniffing += data
        head = bytes(self._sniffing[:_SNIFF])
        if any(head.startswith(p) for p in _PREFIXES):
            buffered, self._sniffing, self._relay_head = bytes(self._sniffing), None, bytearray()
            return self._read_relay_head(buffered)
        if len(head) < _SNIFF and any(p.startswith(head) for p in _PREFIXES):
            return None  # too few bytes yet to tell
        buffered, self._sniffing = bytes(self._sniffing), None
        return super().data_received(buffered)

    def _read_relay_head(self, data: bytes) -> None:
        self._relay_head += data
        end = self._relay_head.find(b"\r\n\r\n")
        if end > MAX_HEADER_BYTES or (end < 0 and len(self._relay_head) > MAX_HEADER_BYTES):
            self._refuse_headers()
            return
        if end < 0:
            return
        head, rest = bytes(self._relay_head[:end + 4]), bytes(self._relay_head[end + 4:])
        self._relay_head = bytearray()  # stays non-None: nothing after this goes to uvicorn's parser
        self._stop_deadline()
        parser = h11.Connection(h11.SERVER)
        parser.receive_data(head)
        try:
            request = parser.next_event()
        except h11.RemoteProtocolError as exc:
            _answer(self.transport, 400, "Bad Request", f"malformed relay request: {exc}")
            self.transport.close()
            return
        if not isinstance(request, h11.Request):
            _answer(self.transport, 400, "Bad Request", "malformed relay request")
            self.transport.close()
            return
        self.loop.create_task(self.relay.handle(self, request, rest))

    def take_over(self) -> asyncio.Transport:
        """The connection, now the relay's: no longer uvicorn's, nor counted against its address's cap for
        connections without a token (the relay bounds its own: one link per node, tunnels per scientist)."""
        self._stop_deadline()
        self._uncount()
        self.connections.discard(self)
        self.relay.opened(self.transport)
        return self.transport

    def peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"

    def _headers_too_slow(self) -> None:
        if self._relay_head is not None and self.cycle is None:
            self.transport.close()
            return
        super()._headers_too_slow()


def relay_protocol(relay: Relay) -> type[RelayHttpProtocol]:
    """The protocol class for a uvicorn server whose relay requests go to ``relay``."""
    return type("GridHttpProtocol", (RelayHttpProtocol,), {"relay": relay})
