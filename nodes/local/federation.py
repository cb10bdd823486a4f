"""A whole federation on this machine: CA, grid and data nodes as real processes over TLS on loopback.

Used by ``voxgrid demo``, the quickstart notebook, the end-to-end tests and the benchmarks. It
drives the same functions and commands a site's IT person uses (``voxgrid node start`` etc.).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from voxgrid.datasets import SiteSpec, default_sites, write_site
from voxgrid.pki import create_ca, issue_certificate

from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    kind: str
    home: Path
    port: int
    log: Path
    popen: subprocess.Popen | None = None
    outbound: bool = False  # listens on nothing; reached through the grid's relay

    @property
    def url(self) -> str:
        return f"https://{self.name}:443" if self.outbound else f"https://127.0.0.1:{self.port}"


@dataclass
class LocalFederation:
    """Build with :meth:`create`, then :meth:`start`; use as a context manager to stop everything."""

    root: Path
    ca_cert: Path
    scientist_token: str
    grid: Proc
    nodes: list[Proc] = field(default_factory=list)
    threads: int = 1
    device: str = "auto"

    @classmethod
    def create(cls, root: Path, sites: list[SiteSpec] | None = None, *, fmt: str = "nifti",
               tags: tuple[str, ...] = ("ct", "pancreas"), splits=(0.5, 0.25, 0.25), threads: int = 1,
               device: str = "auto", scientist: str = "scientist", outbound: tuple[str, ...] = (),
               policy: str = "open") -> LocalFederation:
        """Write CA, certificates, phantom data, a grid home and one node home per site; the sites named
        in ``outbound`` run in outbound mode (no listening socket; reached through the grid's relay).
        ``policy``: every site's dataset policy (open: the phantom federation's studies run unreviewed;
        'review' for the owners' approval flow, ``voxgrid demo --review``)."""
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        sites = sites if sites is not None else default_sites()
        ca = create_ca(root / "ca")
        hosts = ["127.0.0.1", "localhost"]
        scientist_file = root / "scientist.token"
        scientist_file.unlink(missing_ok=True)

        gcert = issue_certificate(ca, root / "certs", "grid", hosts)
        gport = free_port()
        ghome = root / "grid"
        admin.init_home("grid", ghome, "grid", ca_cert=ca.cert, cert=gcert.cert, key=gcert.key, port=gport)
        token = admin.issue_token(ghome, "grid", scientist, "scientist", scientist_file)
        grid = Proc("grid", "grid", ghome, gport, root / "logs" / "grid.log")

        nodes = []
        for site in sites:
            name = f"node-{site.name}"
            data = write_site(site, root / "data" / site.name, fmt=fmt)
            cert = issue_certificate(ca, root / "certs", name, [name, *hosts])
            port = free_port()
            home = root / "nodes" / name
            admin.init_home("node", home, name, ca_cert=ca.cert, cert=cert.cert, key=cert.key, port=port,
                            device=device, threads=threads)
            gtoken = root / "certs" / f"{name}.grid.token"
            gtoken.unlink(missing_ok=True)
            admin.issue_token(ghome, "grid", name, "node", gtoken)
            admin.set_grid(home, grid.url, gtoken)
            if site.name in outbound:
                admin.set_outbound(home)
            site_tags = list(tags) + (["tumor"] if "tumor" in site.labels.values() else [])
            admin.add_dataset(home, site.name, data / "images", data / "labels", tags=site_tags,
                              label_names=dict(site.labels), splits=splits,
                              description=f"synthetic abdominal CT phantoms ({site.name})", policy=policy)
            admin.issue_token(home, "node", scientist, "scientist", scientist_file)
            nodes.append(Proc(name, "node", home, port, root / "logs" / f"{name}.log", outbound=site.name in outbound))
        return cls(root, ca.cert, token, grid, nodes, threads, device)

    # processes ---------------------------------------------------------------------------------
    def _launch(self, p: Proc) -> None:
        p.log.parent.mkdir(parents=True, exist_ok=True)
        Home(p.home, p.kind).run_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        with open(p.log, "ab") as log:
            p.popen = subprocess.Popen([sys.executable, "-m", "voxgrid", p.kind, "start", "--home", str(p.home),
                                        "--port", str(p.port), "--verbose"], stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    def _wait_ready(self, p: Proc, timeout: float = 120.0) -> None:
        run = Home(p.home, p.kind).run_file
        deadline = time.monotonic() + timeout
        while not run.exists():
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}; log:\n{p.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{p.name} not ready after {timeout} s; log:\n{p.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def start(self, timeout: float = 120.0) -> LocalFederation:
        """Start the grid and every node; return when all listen and every node is registered."""
        self._launch(self.grid)
        self._wait_ready(self.grid, timeout)
        for p in self.nodes:
            self._launch(p)
        for p in self.nodes:
            self._wait_ready(p, timeout)
        self.wait_registered(timeout)
        return self

    def wait_registered(self, timeout: float = 60.0) -> None:
        """Until every node is registered and every outbound node's link to the grid is up."""
        from voxgrid.client import GridClient

        deadline = time.monotonic() + timeout
        outbound = {p.name for p in self.nodes if p.outbound}
        with GridClient(self.grid.url, self.scientist_token, self.ca_cert) as g, \
                GridClient(self.grid.url, self.grid_owner_token(), self.ca_cert) as owner:
            while ({n.name for n in g.nodes()} < {p.name for p in self.nodes}
                   or outbound - {link.node for link in owner.links()}):
                if time.monotonic() > deadline:
                    raise TimeoutError("nodes did not register (or link up) with the grid in time")
                time.sleep(0.1)

    def grid_owner_token(self) -> str:
        return Home(self.grid.home, "grid").owner_token_file.read_text().strip()

    def node_client(self, index: int, token: str | None = None):
        """A client for one node as its owner (or with ``token``), directly or through the relay."""
        from voxgrid.client import NodeClient, Relayed

        p = self.nodes[index]
        via = Relayed(self.grid.url, self.scientist_token) if p.outbound else None
        return NodeClient(p.url, token or self.owner_token(index), self.ca_cert, via=via)

    def kill_node(self, index: int) -> None:
        """SIGKILL a node's process group (server and executor): a crash, not a shutdown."""
        p = self.nodes[index]
        os.killpg(p.popen.pid, signal.SIGKILL)
        p.popen.wait()

    def restart_node(self, index: int, timeout: float = 120.0) -> None:
        p = self.nodes[index]
        self._launch(p)
        self._wait_ready(p, timeout)

    def stop(self) -> None:
        procs = [p for p in [*self.nodes, self.grid] if p.popen and p.popen.poll() is None]
        for p in procs:
            os.killpg(p.popen.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()

    def connect(self):
        """A scientist's :class:`voxgrid.Grid` for this federation."""
        import voxgrid

        return voxgrid.connect(self.grid.url, token=self.scientist_token, ca=self.ca_cert)

    def owner_token(self, index: int) -> str:
        return Home(self.nodes[index].home).owner_token_file.read_text().strip()

    def describe(self) -> dict:
        return {"grid": self.grid.url, "ca": str(self.ca_cert),
                "nodes": {p.name: p.url for p in self.nodes}}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1))
