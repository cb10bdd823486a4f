"""Test support: several hosts on one machine, each in its own Linux network namespace.

One namespace acts as the switch (a bridge, no address); every host namespace is joined to it by a
veth pair (``eth0`` in the host, ``p<i>`` on the bridge) and resolves every other host by name
through its own ``/etc/netns/<ns>/hosts`` (``ip netns exec`` bind-mounts it over ``/etc/hosts``).
No host namespace has a route out, and the machine's own namespace gets no interface, so nothing
here can clash with the machine's network (:meth:`Lab.route_only` narrows a host's routes further,
to some lab hosts only). Needs root and iproute2; :meth:`Lab.firewall_inbound` needs
nftables (``nft``) and :meth:`Lab.proxy` tinyproxy (scripts/setup.sh installs both).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")  # where 'ip netns add' pins each namespace
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

# A host's inbound firewall: nothing may open a TCP connection to it from outside; replies to the
# connections it opens itself come back (conntrack), and its loopback is left alone.
FIREWALL_INBOUND = """\
table inet vg_inbound {
    chain input {
        type filter hook input priority filter; policy accept;
        iif "lo" accept
        ct state established,related accept
        meta l4proto tcp ct state new drop
    }
}
"""


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


def proxy_env(url: str, env: dict | None = None) -> dict:
    """``env`` (default: this process's environment) for a process that must go out through the proxy
    at ``url``: every proxy variable set to it, and no exceptions but localhost."""
    env = dict(os.environ if env is None else env)
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        env[var] = env[var.upper()] = url
    env["no_proxy"] = env["NO_PROXY"] = "localhost,127.0.0.1"
    return env


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


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
class Proxy:
    """A tinyproxy that :meth:`Lab.proxy` started; :meth:`Lab.close` stops it."""

    host: str  # the lab's key for the host it runs on
    url: str  # http://<host name>:<port>, with user:password@ when it asks for them
    address: str
    port: int
    conf: Path
    log: Path  # tinyproxy's own log (LogFile); what it printed goes to ``log`` with .out added
    proc: subprocess.Popen


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

    def socket(self, host: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket made in the host's namespace, from this process: it stays there whichever thread uses
        it. Give it addresses, not names (name look-ups here read the machine's own hosts file)."""
        made: dict = {}

        def make() -> None:  # setns moves only the calling thread, so do it in one of our own
            try:
                with open("/proc/thread-self/ns/net") as own, open(NETNS_RUN / self.hosts[host].ns) as there:
                    _setns(there.fileno())
                    try:
                        made["sock"] = socket.socket(family, kind)
                    finally:
                        _setns(own.fileno())
            except BaseException as exc:  # raised again in the caller's thread
                made["error"] = exc

        t = threading.Thread(target=make, name=f"netns-{host}")
        t.start()
        t.join()
        if "error" in made:
            raise made["error"]
        return made["sock"]

    def firewall_inbound(self, host: str) -> None:
        """Drop every new TCP connection coming into the host (from any other host; its own loopback is
        free): it can still connect out and get its replies, and no one can connect to it."""
        r = subprocess.run(self.argv(host, ["nft", "-f", "-"]), input=FIREWALL_INBOUND, capture_output=True,
                           text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"nft on {host}: {r.stderr.strip()}")

    def route_only(self, host: str, to: list[str]) -> None:
        """Leave the host a route to the hosts ``to`` (lab keys) and to nothing else: its route to the lab's
        subnet goes, and one route per host in ``to`` takes its place. A connection to any other host then
        fails at once ('Network is unreachable'), as at a site whose only way out is its proxy."""
        h = self.hosts[host]
        _ip("-n", h.ns, "route", "del", f"{self.subnet}.0/24", "dev", "eth0")
        for key in to:
            _ip("-n", h.ns, "route", "add", f"{self.hosts[key].address}/32", "dev", "eth0")

    def proxy(self, host: str, port: int, folder: Path, connect_ports: list[int],
              auth: tuple[str, str] | None = None, timeout: float = 10.0) -> Proxy:
        """Start a tinyproxy on ``host`` listening on ``port``, and wait until it listens. It serves lab
        clients only and tunnels only: CONNECT to ``connect_ports`` (any lab host), nothing else; a plain
        ``GET http://...`` is refused (403, by a URL filter that matches only CONNECT's host:port); no
        ``connect_ports`` at all refuses CONNECT too. With ``auth`` (user, password) it asks for them (407
        without; 401 for wrong ones). Its config and logs go in ``folder``; its URL names the host by name,
        with the credentials in it when there are some."""
        h = self.hosts[host]
        folder.mkdir(parents=True, exist_ok=True)
        rules = folder / f"tinyproxy-{host}-{port}.filter"
        # Under FilterURLs the filter sees a CONNECT as "host:port" and a proxied request as its full
        # URL ("http://host/..."): allowing only what has no "/" lets tunnels through and nothing else.
        rules.write_text("^[^/]+:[0-9]+$\n")
        log = folder / f"tinyproxy-{host}-{port}.log"
        conf = folder / f"tinyproxy-{host}-{port}.conf"
        lines = [f"Port {port}", f"Listen {h.address}", "Timeout 600", f"LogFile \"{log}\"", "LogLevel Info",
                 "MaxClients 100", f"Allow {self.subnet}.0/24", "DisableViaHeader Yes",
                 f"Filter \"{rules}\"", "FilterURLs Yes", "FilterType ere", "FilterDefaultDeny Yes",
                 *(f"ConnectPort {p}" for p in connect_ports or [0])]
        if auth:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        conf.write_text("\n".join(lines) + "\n")
        p = self.popen(host, ["tinyproxy", "-d", "-c", str(conf)], log.with_name(log.name + ".out"))
        deadline = time.monotonic() + timeout
        while True:
            with self.socket(host) as probe:
                probe.settimeout(1.0)
                if probe.connect_ex((h.address, port)) == 0:
                    break
            if p.poll() is not None or time.monotonic() > deadline:
                out = log.with_name(log.name + ".out")
                raise RuntimeError(f"tinyproxy on {host}:{port} " +
                                   (f"exited with {p.returncode}" if p.poll() is not None else "does not listen") +
                                   f"; output:\n{out.read_text()[-2000:]}\nlog:\n" +
                                   (log.read_text()[-2000:] if log.exists() else ""))
            time.sleep(0.05)
        cred = f"{quote(auth[0], safe='')}:{quote(auth[1], safe='')}@" if auth else ""
        return Proxy(host, f"http://{cred}{h.name}:{port}", h.address, port, conf, log, p)

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


def wait_for_file(path: Path, procs: dict, timeout: float) -> Path:
    """Wait for ``path`` to appear; fail at once, with the logs, if one of ``procs`` ({name: (popen, log)}) exits."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        for name, (p, log) in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; log:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} not written after {timeout} s; logs:\n" +
                               "\n".join(f"--- {n}\n{log.read_text()[-1500:]}" for n, (_, log) in procs.items()))
        time.sleep(0.05)
    return path
