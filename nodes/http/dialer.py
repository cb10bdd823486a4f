"""A node in outbound mode: it listens on nothing and dials its grid, which relays scientists to it.

The node's HTTPS server listens on a Unix socket in a private folder; this module keeps a control
link open to the grid (``GET /v1/relay/listen``, upgraded) and, for every tunnel the grid asks for,
dials once more (``POST /v1/relay/attach/<id>``) and splices that connection to the local socket.
The bytes it carries are the scientist's TLS session with the node's own server: the dialer never
sees them in the clear. Every connection to the grid goes through the site's forward proxy when one
is configured (``proxy`` in node.json, else ``HTTPS_PROXY``/``NO_PROXY``), as ``CONNECT`` only.
A broken link is redialled with exponential backoff and full jitter; jobs keep running meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger("voxgrid.dialer")

LISTEN_PATH = "/v1/relay/listen"
ATTACH_PATH = "/v1/relay/attach/"
UPGRADE = "voxgrid-relay/1"
CONNECT_TIMEOUT_S = 15.0
#: Seconds between pings; a link silent for 3 of them is taken for dead and redialled.
PING_S = 20.0
MAX_LINE = 4096
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0


class LinkError(ConnectionError):
    """A hop of the path to the grid failed; ``hop`` names it: 'proxy', 'proxy CONNECT', 'TLS', 'grid'."""

    def __init__(self, hop: str, detail: str):
        super().__init__(f"{hop}: {detail}")
        self.hop, self.detail = hop, detail


@dataclass(frozen=True)
class Route:
    """How to reach the grid: its URL, the CA that signed it, the node's grid token, and the proxy."""

    grid_url: str
    ca: Path
    token: str
    proxy: str | None = None  # http://host:port (https:// also works)
    proxy_auth: str | None = None  # "user:password"

    @classmethod
    def for_grid(cls, grid_url: str, ca: Path, token: str, proxy: str | None = None,
                 proxy_credentials: Path | None = None) -> Route:
        """The route, with the proxy from ``proxy`` or else the environment (``NO_PROXY`` honoured)."""
        host = urlsplit(grid_url).hostname or ""
        if proxy is None and not urllib.request.proxy_bypass_environment(host):
            env = urllib.request.getproxies_environment()
            proxy = env.get("https") or env.get("all")
        auth = None
        if proxy and urlsplit(proxy).username:
            parts = urlsplit(proxy)
            auth = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        if proxy_credentials is not None:
            auth = Path(proxy_credentials).read_text().strip()
            if ":" not in auth:
                raise ValueError(f"{proxy_credentials}: proxy credentials must be one line 'user:password'")
        return cls(grid_url, Path(ca), token, proxy, auth)

    @classmethod
    def of_node(cls, home, cfg) -> Route:
        """The route of a node home (``voxgrid.nodes.service.home``): its grid, CA, grid token and proxy."""
        token_file = home.path / (cfg.grid_token_file or "grid.token")
        if not cfg.grid_url or not token_file.is_file():
            raise FileNotFoundError(f"no grid URL or no grid token file ({token_file}) in the node home: set them "
                                    "with 'voxgrid node register --grid URL --grid-token-file FILE'")
        credentials = home.path / cfg.proxy_credentials_file if cfg.proxy_credentials_file else None
        return cls.for_grid(cfg.grid_url, home.tls / "ca.crt", token_file.read_text().strip(), cfg.proxy,
                            credentials)

    def httpx_proxy(self):
        """The proxy for an httpx client (the node's registration calls), None when there is none."""
        import httpx

        if not self.proxy:
            return None
        return httpx.Proxy(self.proxy, auth=tuple(self.proxy_auth.split(":", 1)) if self.proxy_auth else None)

    @property
    def credential(self) -> str:
        """What the grid checks (it never sees the token itself)."""
        from voxgrid.client import grid_credential

        return grid_credential(self.token)

    @property
    def grid(self) -> tuple[str, int]:
        parts = urlsplit(self.grid_url)
        return parts.hostname or "", parts.port or 443


async def open_grid(route: Route) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to the grid, through the proxy if there is one; :class:`LinkError` names the failing hop."""
    host, port = route.grid
    if route.proxy:
        reader, writer = await _proxy_tunnel(route, host, port)
    else:
        reader, writer = await _tcp(host, port, "grid TCP")
    ctx = ssl.create_default_context(cafile=str(route.ca))
    try:
        await asyncio.wait_for(writer.start_tls(ctx, server_hostname=host), CONNECT_TIMEOUT_S)
    except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
        writer.close()
        raise LinkError("TLS", f"TLS with the grid {host}:{port} failed: {exc or type(exc).__name__}") from exc
    return reader, writer


async def _tcp(host: str, port: int, hop: str):
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        raise LinkError(hop, f"cannot connect to {host}:{port}: {exc or 'timed out'}") from exc


async def _proxy_tunnel(route: Route, host: str, port: int):
    proxy = urlsplit(route.proxy)
    reader, writer = await _tcp(proxy.hostname or "", proxy.port or 3128, "proxy")
    if proxy.scheme == "https":
        ctx = ssl.create_default_context()
        await writer.start_tls(ctx, server_hostname=proxy.hostname)
    head = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if route.proxy_auth:
        head += f"Proxy-Authorization: Basic {base64.b64encode(route.proxy_auth.encode()).decode()}\r\n"
    writer.write((head + "\r\n").encode())
    status, reason = await _read_head(reader, "proxy CONNECT")
    if status != 200:
        writer.close()
        raise LinkError("proxy CONNECT", f"proxy {proxy.hostname}:{proxy.port} refused CONNECT to {host}:{port}: "
                                         f"{status} {reason}")
    return reader, writer


async def _read_head(reader: asyncio.StreamReader, hop: str) -> tuple[int, str]:
    """The status of an HTTP response whose head is read (and dropped) up to its blank line."""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT_S)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, OSError) as exc:
        raise LinkError(hop, f"no HTTP answer ({type(exc).__name__})") from exc
    line = raw.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise LinkError(hop, f"not an HTTP answer: {line[:80]!r}")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


async def upgrade(route: Route, method: str, path: str):
    """Dial the grid and turn the connection into a relay link (101), or raise naming the grid's reason."""
    reader, writer = await open_grid(route)
    host, port = route.grid
    writer.write((f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {route.credential}\r\n"
                  f"Connection: Upgrade\r\nUpgrade: {UPGRADE}\r\nContent-Length: 0\r\n\r\n").encode())
    status, reason = await _read_head(reader, "grid")
    if status != 101:
        detail = (await _read_some(reader)).decode(errors="replace")
        writer.close()
        try:
            detail = json.loads(detail).get("detail", detail)
        except (ValueError, AttributeError):
            pass
        raise LinkError("grid", f"the grid refused {path}: {status} {reason}: {detail}")
    return reader, writer


async def _read_some(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(4096), 2.0)
    except (asyncio.TimeoutError, OSError):
        return b""


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()  # back-pressure: never more than a buffer's worth in memory
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        pass


class Dialer:
    """Keeps the node's control link to the grid up and serves each tunnel from the local socket."""

    def __init__(self, route: Route, socket_path: Path):
        self.route, self.socket_path = route, socket_path
        self.connected = threading.Event()
        self.last_error: str | None = None
        self._tunnels: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=lambda: asyncio.run(self.run()), name="grid-dialer", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def run(self) -> None:
        """Dial, serve, and redial with backoff and jitter until :meth:`stop`."""
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self._session()
            except (LinkError, OSError, asyncio.IncompleteReadError) as exc:
                self.last_error = str(exc)
                log.warning("link to grid %s: %s", self.route.grid_url, exc)
            self.connected.clear()
            failures = 0 if time.monotonic() - started > 60 else failures + 1
            delay = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** failures))  # full jitter
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _session(self) -> None:
        reader, writer = await upgrade(self.route, "GET", LISTEN_PATH)
        self.connected.set()
        self.last_error = None
        log.info("connected to grid %s", self.route.grid_url)
        pinger = asyncio.create_task(self._ping(writer))
        stop = asyncio.create_task(self._stop.wait())
        try:
            while True:
                line = asyncio.create_task(reader.readline())
                done, _ = await asyncio.wait({line, stop}, timeout=3 * PING_S, return_when=asyncio.FIRST_COMPLETED)
                if stop in done or not done:
                    line.cancel()
                    if not done:
                        raise LinkError("grid", f"the control link was silent for {3 * PING_S:.0f} s")
                    return
                self._handle(line.result(), writer)
        finally:
            pinger.cancel()
            stop.cancel()
            writer.close()

    def _handle(self, raw: bytes, writer: asyncio.StreamWriter) -> None:
        if not raw:
            raise LinkError("grid", "the grid closed the control link")
        if len(raw) > MAX_LINE:
            raise LinkError("grid", "a control line too long")
        try:
            message = json.loads(raw)
        except ValueError:
            raise LinkError("grid", f"a control line that is not JSON: {raw[:80]!r}") from None
        if isinstance(message, dict) and isinstance(message.get("open"), str):
            task = asyncio.create_task(self._tunnel(message["open"]))
            self._tunnels.add(task)
            task.add_done_callback(self._tunnels.discard)
        elif isinstance(message, dict) and "ping" in message:
            writer.write(json.dumps({"pong": message["ping"]}).encode() + b"\n")

    async def _ping(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(PING_S)
            writer.write(json.dumps({"ping": time.time()}).encode() + b"\n")

    async def _tunnel(self, tunnel: str) -> None:
        try:
            grid_r, grid_w = await upgrade(self.route, "POST", ATTACH_PATH + tunnel)
            local_r, local_w = await asyncio.open_unix_connection(str(self.socket_path))
        except (LinkError, OSError) as exc:
            log.warning("tunnel %s: %s", tunnel[:8], exc)
            return
        pumps = {asyncio.create_task(_pump(grid_r, local_w)), asyncio.create_task(_pump(local_r, grid_w))}
        try:
            # One side ending ends the tunnel: TLS has no half-close here, and a server that dropped a
            # tampered session must not leave the scientist waiting for an answer that cannot come.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            grid_w.close()
            local_w.close()


_HOPS = {"proxy": "the forward proxy accepts connections", "proxy CONNECT": "the proxy tunnels to the grid",
         "grid TCP": "the grid accepts connections", "TLS": "the grid's certificate checks against the federation CA",
         "grid": "the grid accepts this node's token: it can relay scientists to this node"}


async def check_path(route: Route) -> list[tuple[str, bool, str]]:
    """The doctor's check of the outbound path: (hop, ok, detail) for each hop, up to the first that fails."""
    path = (["proxy", "proxy CONNECT"] if route.proxy else ["grid TCP"]) + ["TLS", "grid"]
    try:
        await _whoami(route)  # not the listen link itself: that would replace a running node's link
    except LinkError as exc:
        failed = path.index(exc.hop)
        return [(h, True, _HOPS[h]) for h in path[:failed]] + [(exc.hop, False, exc.detail)]
    return [(h, True, _HOPS[h]) for h in path]


async def _whoami(route: Route) -> None:
    reader, writer = await open_grid(route)
    host, port = route.grid
    try:
        writer.write((f"GET /v1/whoami HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {route.credential}\r\n"
                      "Connection: close\r\n\r\n").encode())
        status, reason = await _read_head(reader, "grid")
        body = (await _read_some(reader)).decode(errors="replace")
    finally:
        writer.close()
    if status != 200 or '"node"' not in body:
        raise LinkError("grid", f"the grid did not accept this node's token: {status} {reason} {body[:200]}")
