"""The lab itself (tests/netns.py), for nodes that reach out only: a host behind :meth:`Lab.firewall_inbound`
takes no connection from another host but connects out, and a :meth:`Lab.proxy` tunnels CONNECT to the
allowed ports only, proxies nothing else, and asks for its password when it has one. Plain sockets and
curl, no voxgrid processes."""

import base64
import os
import shutil
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from netns import Lab, proxy_env, unavailable  # test support: tests/netns.py

pytestmark = pytest.mark.slow

ALLOWED = 8443  # the grid's port: the only one the proxies tunnel to
OTHER = 8444  # listening too, on the same host, but not allowed
PROXY, AUTH_PROXY = 3128, 3129
AUTH = ("node", "s3cret")
REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


class Server:
    """Answers every connection with REPLY once it has read a request head (or the client stops sending)."""

    def __init__(self, sock: socket.socket, port: int):
        self.sock = sock
        sock.bind(("0.0.0.0", port))
        sock.listen()
        sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                head = b""
                try:
                    while b"\r\n\r\n" not in head and (chunk := conn.recv(4096)):
                        head += chunk
                    conn.sendall(REPLY)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    why = unavailable()
    if why:
        pytest.skip(f"network namespaces cannot be made here: {why}")
    missing = [c for c in ("nft", "tinyproxy", "curl") if not shutil.which(c)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup.sh installs them)")
    folder = tmp_path_factory.mktemp("netns-lab")
    lab = Lab(prefix=f"vl{os.getpid() % 100000}")  # not test_multihost's prefix: both may run in one process
    servers = []
    try:
        for role in ("grid", "node", "proxy", "scientist"):
            lab.add_host(role, f"{role}.vg.test")
        lab.up()
        lab.firewall_inbound("node")
        servers += [Server(lab.socket(role), port) for role in ("grid", "node", "scientist")
                    for port in (ALLOWED, OTHER)]
        # Both in the proxy's namespace, on their own ports.
        yield SimpleNamespace(lab=lab, open=lab.proxy("proxy", PROXY, folder, [ALLOWED]),
                              locked=lab.proxy("proxy", AUTH_PROXY, folder, [ALLOWED], auth=AUTH))
    finally:
        for s in servers:
            s.close()
        lab.close()


def _connect(lab, host: str, to: str, port: int, timeout: float = 2.0) -> socket.socket:
    s = lab.socket(host)
    s.settimeout(timeout)
    try:
        s.connect((lab.hosts[to].address, port))
    except BaseException:
        s.close()
        raise
    return s


def _recv_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def _proxy(lab, host: str, proxy, request: str) -> tuple[str, socket.socket]:
    """Send ``request`` (a head without its blank line) to ``proxy`` from ``host``: its status line, and the
    socket (a tunnel when the status is 200), positioned after the response head."""
    s = _connect(lab, host, proxy.host, proxy.port)
    s.sendall(request.encode() + b"\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)  # one byte at a time: nothing of the tunnel may be read here
        if not chunk:
            break
        head += chunk
    return head.split(b"\r\n", 1)[0].decode(), s


def _curl(lab, host: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(lab.argv(host, ["curl", "-sS", "--max-time", "5", *args]), env=env, capture_output=True,
                          text=True, timeout=15, check=False)


def test_a_firewalled_host_takes_no_connection_but_connects_out(net):
    lab = net.lab
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):  # dropped, not refused: the caller hears nothing
        _connect(lab, "scientist", "node", ALLOWED, timeout=1.5).close()
    assert time.monotonic() - t0 < 2.5
    # Out, and the replies back in.
    with _connect(lab, "node", "scientist", ALLOWED) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: scientist\r\n\r\n")
        assert _recv_all(s).endswith(b"hello")
    # Its own loopback is free.
    with lab.socket("node") as s:
        s.settimeout(2)
        s.connect(("127.0.0.1", ALLOWED))
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert _recv_all(s).endswith(b"hello")
    # Hosts without the firewall still take connections.
    _connect(lab, "scientist", "grid", ALLOWED).close()


def test_the_proxy_tunnels_to_the_allowed_port_only(net):
    lab = net.lab
    grid = lab.hosts["grid"]
    for target in (f"{grid.address}:{ALLOWED}", f"{grid.name}:{ALLOWED}"):  # by address and by name
        status, s = _proxy(lab, "node", net.open, f"CONNECT {target} HTTP/1.1\r\nHost: {target}")
        with s:
            assert status.split()[1] == "200", status
            s.sendall(b"GET / HTTP/1.1\r\nHost: grid\r\n\r\n")
            assert _recv_all(s) == REPLY
    for target in (f"{grid.name}:{OTHER}", f"{grid.name}:22"):
        status, s = _proxy(lab, "node", net.open, f"CONNECT {target} HTTP/1.1\r\nHost: {target}")
        s.close()
        assert status.split()[1] == "403", status
    # curl, told the proxy by the environment, from the firewalled node.
    r = _curl(lab, "node", proxy_env(net.open.url), "--proxytunnel", "-w", " %{http_connect}",
              f"http://{grid.name}:{ALLOWED}/")
    assert r.returncode == 0 and r.stdout == "hello 200", (r.stdout, r.stderr)


def test_the_proxy_refuses_plain_http_proxying(net):
    lab = net.lab
    grid = lab.hosts["grid"]
    for url in (f"http://{grid.name}:{ALLOWED}/", f"http://{grid.address}:{ALLOWED}/x", "http://tinyproxy.stats/"):
        status, s = _proxy(lab, "node", net.open, f"GET {url} HTTP/1.1\r\nHost: {grid.name}")
        s.close()
        assert status.split()[1] == "403", (url, status)
    r = _curl(lab, "node", proxy_env(net.open.url), "-o", "/dev/null", "-w", "%{http_code}",
              f"http://{grid.name}:{ALLOWED}/")
    assert r.stdout == "403", (r.stdout, r.stderr)


def test_the_proxy_with_a_password_asks_for_it(net):
    lab = net.lab
    target = f"{lab.hosts['grid'].name}:{ALLOWED}"
    good = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
    bad = base64.b64encode(f"{AUTH[0]}:wrong".encode()).decode()
    status, s = _proxy(lab, "node", net.locked, f"CONNECT {target} HTTP/1.1\r\nHost: {target}")
    s.close()
    assert status.split()[1] == "407", status
    status, s = _proxy(lab, "node", net.locked,
                       f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {bad}")
    s.close()
    assert status.split()[1] in ("401", "407"), status  # tinyproxy 1.11 answers a wrong password with 401
    status, s = _proxy(lab, "node", net.locked,
                       f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {good}")
    with s:
        assert status.split()[1] == "200", status
        s.sendall(b"GET / HTTP/1.1\r\nHost: grid\r\n\r\n")
        assert _recv_all(s) == REPLY
    # The credentials ride in the proxy URL (curl, like most clients, takes them from there).
    assert net.locked.url == f"http://{AUTH[0]}:{AUTH[1]}@proxy.vg.test:{AUTH_PROXY}"
    r = _curl(lab, "node", proxy_env(net.locked.url), "--proxytunnel", f"http://{target}/")
    assert r.returncode == 0 and r.stdout == "hello", (r.stdout, r.stderr)
    r = _curl(lab, "node", proxy_env(f"http://proxy.vg.test:{AUTH_PROXY}"), "--proxytunnel", "-w", "%{http_connect}",
              f"http://{target}/")
    assert r.returncode != 0 and r.stdout == "407", (r.stdout, r.stderr)
