"""Test support: several hosts on one machine, each in its own Linux network namespace.

One namespace acts as the switch (a bridge, no address); every host namespace is joined to it by a
veth pair (``eth0`` in the host, ``p<i>`` on the bridge) and resolves every other host by name
through its own ``/etc/netns/<ns>/hosts`` (``ip netns exec`` bind-mounts it over ``/etc/hosts``).
No host namespace has a route out, and the machine's own namespace gets no interface, so nothing
here can clash with the machine's network. Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return f"creating network namespaces needs root (running as uid {os.geteuid()})"
    if not shutil.which("ip"):
        return "the 'ip' command (iproute2) is not installed"
    probe = f"vgprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"'ip netns add' failed: {r.stderr.strip() or r.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass
class Host:
    name: str  # host name, e.g. grid.vg.test
    ns: str  # namespace name
    address: str
    port: str  # the switch-side end of its link


@dataclass
class Lab:
    """Build with :meth:`add_host` for each host, then :meth:`up`; :meth:`close` removes everything."""

    prefix: str
    subnet: str = "10.213.0"  # /24, only inside the lab's namespaces
    hosts: dict[str, Host] = field(default_factory=dict)  # by key
    procs: list[subprocess.Popen] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def _add_ns(self, ns: str) -> None:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)  # a leftover of a crashed run
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self, key: str, name: str) -> Host:
        """A host the lab calls ``key`` (as in :meth:`popen`, :meth:`cut`), named ``name`` on the network."""
        if not self._made:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        i = len(self.hosts)
        host = Host(name, f"{self.prefix}-h{i}", f"{self.subnet}.{i + 10}", f"p{i}")
        self._add_ns(host.ns)
        _ip("link", "add", "eth0", "netns", host.ns, "type", "veth", "peer", "name", host.port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", host.port, "master", "br0")
        _ip("-n", self.switch, "link", "set", host.port, "up")
        _ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.ns, "link", "set", "eth0", "up")
        self.hosts[key] = host
        return host

    def up(self) -> Lab:
        """Write every host's hosts file (all lab names, and localhost)."""
        lines = ["127.0.0.1 localhost", *(f"{h.address} {h.name}" for h in self.hosts.values())]
        for h in self.hosts.values():
            folder = NETNS_ETC / h.ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")
        return self

    def argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host].ns, *argv]

    def popen(self, host: str, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start ``argv`` on ``host`` in its own process group (so :meth:`close` can stop all it forks)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            p = subprocess.Popen(self.argv(host, argv), stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def cut(self, host: str) -> None:
        """Unplug the host's cable at the switch: its packets go nowhere, and nobody is told."""
        _ip("-n", self.switch, "link", "set", self.hosts[host].port, "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[host].port, "up")

    def close(self) -> None:
        """Stop every process started here, then delete the namespaces (and their links) and hosts files."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever is left of the group, e.g. a worker whose server died first
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._made.clear()
        try:
            NETNS_ETC.rmdir()  # only if empty: other namespaces of this machine keep theirs
        except OSError:
            pass
