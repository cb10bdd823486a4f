"""Serving a node or the grid over HTTPS with uvicorn, and registering a node with its grid."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import uvicorn

from voxgrid.client import GridClient, VoxgridError

from voxgrid.nodes.service.home import Home
from voxgrid.nodes.http.protocol import BoundedHttpProtocol

log = logging.getLogger("voxgrid.server")


def _serve(app, home: Home, host: str, port: int, on_listening) -> None:
    config = uvicorn.Config(app, host=host, port=port, ssl_certfile=str(home.tls / "server.crt"),
                            ssl_keyfile=str(home.tls / "server.key"), log_level="warning", access_log=False,
                            timeout_keep_alive=120, timeout_graceful_shutdown=2, http=BoundedHttpProtocol)
    server = uvicorn.Server(config)

    def announce():
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        on_listening(bound)

    threading.Thread(target=announce, daemon=True).start()
    home.run_file.unlink(missing_ok=True)
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so our cleanup runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run()
    finally:
        home.run_file.unlink(missing_ok=True)


def _write_run_file(home: Home, url: str) -> None:
    tmp = home.run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    os.replace(tmp, home.run_file)


def serve_node(home: Home, host: str | None = None, port: int | None = None) -> None:
    """Run a data node in the foreground until SIGINT/SIGTERM."""
    from voxgrid.nodes.http.app import create_app
    from voxgrid.nodes.service.node import NodeService

    service = NodeService(home)
    cfg = service.config
    host = host or cfg.host
    port = cfg.port if port is None else port

    def listening(bound: int):
        cfg.host, cfg.port = host, bound
        url = service.public_url()
        # Ready means ready to train: a job sent now must not wait for the worker's imports.
        if not service.executor.ready.wait(timeout=300):
            log.error("the executor is not ready after 300 s; serving anyway")
        _write_run_file(home, url)
        log.info("node %s listening on %s", cfg.name, url)
        if cfg.grid_url:
            threading.Thread(target=_keep_registered, args=(service,), daemon=True, name="grid-heartbeat").start()

    try:
        _serve(create_app(service), home, host, port, listening)
    finally:
        service.close()


#: Seconds between re-registrations: datasets added while the node runs reach the grid this quickly.
HEARTBEAT_S = float(os.environ.get("VOXGRID_HEARTBEAT_S", "30"))


def _keep_registered(service) -> None:
    register_with_grid(service)
    while True:
        time.sleep(HEARTBEAT_S)
        register_with_grid(service, attempts=1)


def register_with_grid(service, attempts: int = 30) -> bool:
    """Tell the grid our published metadata; retries while the grid is not up yet."""
    cfg, home = service.config, service.home
    token_file = cfg.grid_token_file and (home.path / cfg.grid_token_file)
    if not token_file or not token_file.is_file():
        log.error("cannot register with grid %s: no grid token file in the node home", cfg.grid_url)
        return False
    token = token_file.read_text().strip()
    delay = 0.2
    for _ in range(attempts):
        try:
            with GridClient(cfg.grid_url, token, home.tls / "ca.crt") as grid:
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

    service = GridService(home)
    cfg = service.config
    host = host or cfg.host

    def listening(bound: int):
        _write_run_file(home, cfg.public_url or f"https://{host}:{bound}")

    try:
        _serve(create_grid_app(service), home, host, cfg.port if port is None else port, listening)
    finally:
        service.close()
