"""Serving a node or the grid over HTTPS with uvicorn, and registering a node with its grid."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from voxgrid.client import GridClient, VoxgridError

from voxgrid.nodes.service.home import Home
from voxgrid.nodes.http.protocol import BoundedHttpProtocol

log = logging.getLogger("voxgrid.server")


def _serve(app, home: Home, host: str, port: int, on_listening, protocol=BoundedHttpProtocol,
           sock: socket.socket | None = None) -> None:
    config = uvicorn.Config(app, host=host, port=port, ssl_certfile=str(home.tls / "server.crt"),
                            ssl_keyfile=str(home.tls / "server.key"), log_level="warning", access_log=False,
                            timeout_keep_alive=120, timeout_graceful_shutdown=2, http=protocol)
    server = uvicorn.Server(config)

    def announce():
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.02)
        name = server.servers[0].sockets[0].getsockname()
        on_listening(name[1] if isinstance(name, tuple) else 0)

    threading.Thread(target=announce, daemon=True).start()
    home.run_file.unlink(missing_ok=True)
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so our cleanup runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        home.run_file.unlink(missing_ok=True)


def _write_run_file(home: Home, url: str, **extra) -> None:
    tmp = home.run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), **extra}))
    os.replace(tmp, home.run_file)


def serve_node(home: Home, host: str | None = None, port: int | None = None, console_host: str | None = None,
               console_port: int | str | None = None) -> None:
    """Run a data node in the foreground until SIGINT/SIGTERM: on ``host:port``, or in outbound mode on
    a private Unix socket that only the dialer (:mod:`.dialer`) connects to. Its owner console listens on
    ``console_host:console_port`` (None: as configured; port ``"off"``: no console; 0: any free port)."""
    from voxgrid.nodes.http.app import create_app
    from voxgrid.nodes.service.node import NodeService

    service = NodeService(home)
    cfg = service.config
    host = host or cfg.host
    port = cfg.port if port is None else port
    outbound = cfg.connect == "outbound"
    sock = _private_socket() if outbound else None
    sock_path = Path(sock.getsockname()) if sock is not None else None
    cfg.console_host = console_host or cfg.console_host
    cfg.console_port = None if console_port == "off" else cfg.console_port if console_port is None else console_port
    console, console_url = None, None

    def listening(bound: int):
        if not outbound:
            cfg.host, cfg.port = host, bound
        url = service.public_url()
        # Ready means ready to train: a job sent now must not wait for the worker's imports.
        if not service.executor.ready.wait(timeout=300):
            log.error("the executor is not ready after 300 s; serving anyway")
        extra = {"console": console_url} if console_url else {}
        if outbound:
            _dialer(service, sock_path).start()
            _write_run_file(home, url, connect="outbound", socket=str(sock_path), **extra)
        else:
            _write_run_file(home, url, **extra)
        log.info("node %s serving %s", cfg.name, f"through grid {cfg.grid_url}" if outbound else f"on {url}")
        if cfg.grid_url:
            threading.Thread(target=_keep_registered, args=(service,), daemon=True, name="grid-heartbeat").start()

    try:
        if cfg.console_port is not None:
            console = OwnerConsole(service, home)
            console_url = console.start()  # before the run file is written: it names the console
        _serve(create_app(service), home, host, port, listening, sock=sock)
    finally:
        if console is not None:
            console.stop()
        service.close()
        if sock_path is not None:
            shutil.rmtree(sock_path.parent, ignore_errors=True)


class OwnerConsole:
    """The owner console (:mod:`.console`) over HTTPS with the node's certificate, on its own port, served by
    a uvicorn of its own in a thread beside the node's: a separate port keeps it off the address scientists
    reach (loopback by default) and a fault in it off their jobs."""

    def __init__(self, service, home: Home):
        from voxgrid.nodes.http.console import create_console_app

        cfg = service.config
        self.host = cfg.console_host
        config = uvicorn.Config(create_console_app(service), host=self.host, port=cfg.console_port,
                                ssl_certfile=str(home.tls / "server.crt"), ssl_keyfile=str(home.tls / "server.key"),
                                log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="owner-console")

    def start(self, timeout: float = 30) -> str | None:
        """Listen; the console's URL, or None (logged) when it cannot (the port is taken): the node serves on."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                log.error("owner console not started on %s (see above); the node serves without it", self.host)
                return None
            time.sleep(0.02)
        bound = self.server.servers[0].sockets[0].getsockname()[1]
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else f"[{self.host}]" if ":" in self.host else self.host
        log.info("owner console on https://%s:%d/", host, bound)
        return f"https://{host}:{bound}/"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def _private_socket() -> socket.socket:
    """A listening Unix socket in a fresh 0700 folder under the temp dir (a home's path may be longer
    than the 107 bytes an AF_UNIX address can hold)."""
    folder = Path(tempfile.mkdtemp(prefix="voxgrid-node-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "node.sock"))
    os.chmod(folder / "node.sock", 0o600)
    sock.listen(128)
    return sock


def _dialer(service, socket_path: Path):
    from voxgrid.nodes.http.dialer import Dialer, Route

    return Dialer(Route.of_node(service.home, service.config), socket_path)


#: Seconds between re-registrations: datasets added while the node runs reach the grid this quickly.
HEARTBEAT_S = float(os.environ.get("VOXGRID_HEARTBEAT_S", "30"))


def _keep_registered(service) -> None:
    register_with_grid(service)
    while True:
        time.sleep(HEARTBEAT_S)
        register_with_grid(service, attempts=1)


def register_with_grid(service, attempts: int = 30) -> bool:
    """Tell the grid our published metadata; retries while the grid is not up yet."""
    from voxgrid.nodes.http.dialer import Route

    cfg, home = service.config, service.home
    try:
        route = Route.of_node(home, cfg)
    except FileNotFoundError as exc:
        log.error("cannot register with grid %s: %s", cfg.grid_url, exc)
        return False
    delay = 0.2
    for _ in range(attempts):
        try:
            with GridClient(cfg.grid_url, route.token, route.ca, via=route.httpx_proxy()) as grid:
                grid.register(service.info())
            log.info("registered with grid %s", cfg.grid_url)
            return True
        except VoxgridError as exc:
            log.warning("grid registration failed (%s); retrying", exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    return False


def serve_grid(home: Home, host: str | None = None, port: int | None = None) -> None:
    from voxgrid.nodes.http.grid import GridService, create_grid_app
    from voxgrid.nodes.http.relay import relay_protocol

    service = GridService(home)
    cfg = service.config
    host = host or cfg.host

    def listening(bound: int):
        _write_run_file(home, cfg.public_url or f"https://{host}:{bound}")

    _raise_file_limit()  # every outbound node holds a connection open
    try:
        _serve(create_grid_app(service), home, host, cfg.port if port is None else port, listening,
               relay_protocol(service.relay))
    finally:
        service.close()


def _raise_file_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
