"""Without a token: connections that never finish their headers (slowloris) cannot hold a node.

Before, a client that finished TLS and then sent its headers slowly or never kept its connection
for ever, before any token could be checked; enough of them used up the node's file descriptors.
The node here runs with a 3 s header deadline and 40 connections per client address.
"""

import os
import socket
import ssl
import time

import httpx
import pytest

from voxgrid.datasets import default_sites
from voxgrid.nodes.local.federation import LocalFederation

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S, PER_ADDRESS = 3, 40


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    env = {"VOXGRID_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "VOXGRID_MAX_CONNECTIONS_PER_ADDRESS": str(PER_ADDRESS)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fed = LocalFederation.create(tmp_path_factory.mktemp("slow"), default_sites(n_sites=1, shape=(32, 32, 32),
                                                                                     n_volumes=4))
        with fed.start():
            yield fed
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _slow_client(fed, port: int) -> ssl.SSLSocket:
    """A TLS connection from another loopback address that sends half a request line and stops."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
    sock = ssl.create_default_context(cafile=str(fed.ca_cert)).wrap_socket(raw, server_hostname="127.0.0.1")
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def _closed_by_server(sock: ssl.SSLSocket) -> bool:
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, socket.timeout):
        return False
    except (ssl.SSLError, ConnectionError, OSError):
        return True


def test_slow_headers_are_cut_off_and_one_address_cannot_take_every_connection(node):
    port = node.nodes[0].port
    owner = httpx.Client(verify=ssl.create_default_context(cafile=str(node.ca_cert)), headers={"Authorization": f"Bearer {node.owner_token(0)}"})
    held = [_slow_client(node, port) for _ in range(PER_ADDRESS + 20)]
    time.sleep(0.5)
    refused = sum(_closed_by_server(s) for s in held)
    assert refused >= 20, f"only {refused} of {len(held)} connections from one address were refused"
    t0 = time.monotonic()
    assert owner.get(f"{node.nodes[0].url}/v1/health").status_code == 200  # the owner, from another address
    assert time.monotonic() - t0 < 2
    time.sleep(HEADER_TIMEOUT_S + 1)
    assert all(_closed_by_server(s) for s in held), "a connection without its headers outlived the deadline"
    for s in held:
        s.close()
    owner.close()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def test_endless_headers_are_refused_before_they_fill_memory(node):
    """Before: 1.5 GB of header lines from a client without a token went into the node's memory in 5 s."""
    pid = node.nodes[0].popen.pid
    before = _rss_mb(pid)
    sock = _slow_client(node, node.nodes[0].port)
    line, sent = b"X-Pad: " + b"a" * 8000 + b"\r\n", 0
    try:
        while sent < 256 * 2 ** 20:
            sock.sendall(line)
            sent += len(line)
    except (ssl.SSLError, ConnectionError, OSError):
        pass  # the node cut the connection
    sock.close()
    assert sent < 64 * 2 ** 20, f"the node took {sent >> 20} MiB of headers"
    assert _rss_mb(pid) - before < 32
