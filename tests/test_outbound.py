"""Outbound mode on loopback: a node that listens on nothing, reached through the grid's relay.

Real processes over real TLS: a grid (tests/hostile_relay.py: the real grid, whose relay can be
turned hostile through a file), node-site-a in outbound mode and node-site-b in direct mode. The
network-level version (firewall, forward proxy, namespaces) is tests/test_multihost_outbound.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

import voxgrid
from voxgrid.client import GridClient, NodeClient
from voxgrid.nodes.service.home import Home

pytestmark = pytest.mark.slow
HOSTILE = Path(__file__).with_name("hostile_relay.py")


def _plan(privacy=None):
    return voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), channels=(8, 16, 32),
                             strides=(2, 2), local_epochs=1, privacy=privacy)


def _start_grid(fed) -> None:
    """The grid from tests/hostile_relay.py, honest until told otherwise, headers due within 2 s."""
    g = fed.grid
    Home(g.home, "grid").run_file.unlink(missing_ok=True)
    g.log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VOXGRID_HEADER_TIMEOUT_S="2", PYTHONUNBUFFERED="1")
    with open(g.log, "ab") as log:
        g.popen = subprocess.Popen([sys.executable, str(HOSTILE), str(g.home), str(g.port)], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, env=env)
    fed._wait_ready(g)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    from voxgrid.datasets import default_sites
    from voxgrid.nodes.local.federation import LocalFederation

    root = tmp_path_factory.mktemp("outbound")
    sites = default_sites(n_sites=2, shape=(32, 32, 32), n_volumes=6)
    f = LocalFederation.create(root, sites, outbound=(sites[0].name,))
    _start_grid(f)
    for p in f.nodes:
        f._launch(p)
    for p in f.nodes:
        f._wait_ready(p)
    f.wait_registered()
    yield f
    f.stop()


def _mode(fed, mode: str) -> None:
    (fed.grid.home / "mode").write_text(mode)


def _relayed(fed, token=None) -> NodeClient:
    return fed.node_client(0, token or fed.scientist_token)


def test_the_outbound_node_listens_on_nothing_and_a_mixed_federation_runs_secure_dp_rounds(fed):
    a, b = fed.nodes
    run = json.loads(Home(a.home).run_file.read_text())
    assert run["connect"] == "outbound" and "socket" in run
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    assert f"pid={a.popen.pid}," not in listening  # no TCP listening socket in the outbound node's process
    assert f"pid={b.popen.pid}," in listening

    ptrs = sorted(fed.connect().search("#ct"), key=lambda p: p.node)
    assert [(p.node, p.url) for p in ptrs] == [(a.name, f"https://{a.name}:443"), (b.name, b.url)]
    privacy = {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
    exp = voxgrid.Experiment(_plan(privacy), ptrs, rounds=2, evaluate=False, seed=1, name="mixed",
                             secure_aggregation=True, threshold=2)
    rounds = exp.run(progress=False)
    assert all(s.ok for r in rounds for s in r.sites), [r.sites for r in rounds]

    # What left node-site-a through the relay is in its ledger, released as masked updates.
    owner = fed.node_client(0)
    assert owner.info().connect == "outbound"
    mine = {j.job_id for j in owner.jobs() if j.experiment_id == exp.experiment_id and j.kind == "train"}
    released = [e for e in owner.ledger().entries if e.job_id in mine and e.state == "released"]
    assert len(mine) == 2 and len(released) == 2 and all(e.dp and e.epsilon > 0 for e in released)
    audit = [(e.action, e.detail) for e in owner.audit(limit=500)]
    assert sum(action == "update.release" and "masked" in detail and detail.split()[1] in mine
               for action, detail in audit) == 2

    with GridClient(fed.grid.url, fed.grid_owner_token(), fed.ca_cert) as grid_owner:
        [link] = grid_owner.links()
    assert link.node == a.name and link.tunnels_total >= 2 and link.bytes_up > 100_000
    with pytest.raises(voxgrid.AccessRefused):  # a scientist does not see the grid's links
        GridClient(fed.grid.url, fed.scientist_token, fed.ca_cert).links()
    out = subprocess.run([sys.executable, "-m", "voxgrid", "grid", "status", "--home", str(fed.grid.home)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and a.name in out.stdout and "connected since" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("mode, match", [
    ("flip-up", "relay failed"), ("flip-down", "relay failed"),
    ("replay-up", "relay failed"), ("replay-down", "relay failed"),
    ("misroute", "(?i)hostname mismatch|certificate"),
])
def test_a_hostile_relay_is_caught_by_tls_and_the_node_keeps_serving(fed, mode, match):
    jobs_before = _job_count(fed)
    _mode(fed, mode)
    try:
        with _relayed(fed) as client, pytest.raises(voxgrid.Unreachable, match=match):
            for _ in range(3):  # flips and replays hit a request or a reply; every path must fail loudly
                client.datasets()
    finally:
        _mode(fed, "honest")
    with _relayed(fed) as client:
        assert client.whoami().name == "scientist"
    assert _job_count(fed) == jobs_before


def _job_count(fed) -> int:
    import sqlite3

    with sqlite3.connect(Home(fed.nodes[0].home).db_file) as db:
        return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


def _raw(fed, head: bytes, read: bool = True) -> bytes:
    if b"\r\nHost:" not in head and b"\r\n" in head:  # h11 insists on one, as HTTP/1.1 does
        line, _, rest = head.partition(b"\r\n")
        head = line + b"\r\nHost: grid\r\n" + rest
    ctx = ssl.create_default_context(cafile=str(fed.ca_cert))
    with socket.create_connection(("127.0.0.1", fed.grid.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(head)
        return s.recv(65536) if read else b""


def test_bad_relay_requests_get_clear_answers_and_the_grid_keeps_serving(fed):
    from voxgrid.client import grid_credential

    a = fed.nodes[0]
    node_token = grid_credential((fed.root / "certs" / f"{a.name}.grid.token").read_text().strip())
    sci = grid_credential(fed.scientist_token)  # what a client sends the grid
    assert b"407" in _raw(fed, f"CONNECT {a.name}:443 HTTP/1.1\r\n\r\n".encode())
    assert b"Bearer" in _raw(fed, f"CONNECT {a.name}:443 HTTP/1.1\r\nProxy-Authorization: Bearer nope\r\n\r\n".encode())
    answer = _raw(fed, f"CONNECT elsewhere:443 HTTP/1.1\r\nProxy-Authorization: Bearer {sci}\r\n\r\n".encode())
    assert b"404" in answer and b"no node is registered at elsewhere:443" in answer
    answer = _raw(fed, f"GET /v1/relay/listen HTTP/1.1\r\nAuthorization: Bearer {sci}\r\n"
                       f"Upgrade: voxgrid-relay/1\r\n\r\n".encode())
    assert b"403" in answer and b"needs the role node" in answer
    answer = _raw(fed, f"POST /v1/relay/attach/forged HTTP/1.1\r\nAuthorization: Bearer {node_token}\r\n"
                       f"Upgrade: voxgrid-relay/1\r\n\r\n".encode())
    assert b"404" in answer and b"no tunnel is waiting" in answer
    assert b"400" in _raw(fed, b"CONNECT \x00\x01garbage\r\n\r\n")
    try:  # an oversized head is cut off, unanswered
        answer = _raw(fed, b"CONNECT x:443 HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 100_000 + b"\r\n\r\n")
    except (ssl.SSLError, OSError):
        answer = b""
    assert answer == b""
    t0 = time.monotonic()  # half-open: a head that never ends is closed at the grid's header deadline (2 s)
    assert _raw(fed, b"CONNECT node-site-a:443 HTTP/1.1\r\n") == b""
    assert time.monotonic() - t0 < 8
    with _relayed(fed) as client:  # still serving, and node-site-a's link survived all of it
        assert client.whoami().role == "scientist"


def test_a_garbage_control_line_drops_only_that_link_and_the_node_redials(fed):
    from voxgrid.client import grid_credential

    a = fed.nodes[0]
    node_token = grid_credential((fed.root / "certs" / f"{a.name}.grid.token").read_text().strip())
    ctx = ssl.create_default_context(cafile=str(fed.ca_cert))
    with socket.create_connection(("127.0.0.1", fed.grid.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        # An impostor holding node-site-a's grid token takes over its link, then sends garbage.
        s.sendall(f"GET /v1/relay/listen HTTP/1.1\r\nHost: grid\r\nAuthorization: Bearer {node_token}\r\n"
                  f"Upgrade: voxgrid-relay/1\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 101")
        s.sendall(b"\xff\xfenot json\n")
        assert s.recv(4096) == b""  # the grid closed it
    deadline = time.monotonic() + 40
    while True:  # the real node's own link was replaced by the impostor's: it redials by itself
        try:
            with _relayed(fed) as client:
                assert client.whoami().role == "scientist"
            break
        except voxgrid.Unreachable:
            assert time.monotonic() < deadline, "node-site-a did not redial"
            time.sleep(0.5)


def test_a_grid_restart_breaks_the_link_and_the_accepted_job_is_collected_after(fed):
    from voxgrid import tensors
    from voxgrid.plan import initial_weights
    from voxgrid.wire import JobRequest

    ptr = [p for p in fed.connect().search("#ct") if p.node == fed.nodes[0].name][0]
    plan = _plan()
    ref = ptr.client.put_weights(tensors.dumps(initial_weights(plan)))
    job = ptr.client.submit(JobRequest(kind="train", experiment_id="restart", round=0, dataset=ptr.name,
                                       plan=plan.model_dump(mode="json"), plan_hash=plan.content_hash,
                                       weights_id=ref.weights_id, evaluate=False))
    os.killpg(fed.grid.popen.pid, signal.SIGKILL)  # the grid dies with the job accepted
    fed.grid.popen.wait()
    with pytest.raises(voxgrid.Unreachable):
        ptr.client.job(job.job_id)
    _start_grid(fed)
    fed.wait_registered(timeout=60)  # the node redialled by itself, with backoff
    status = ptr.client.job(job.job_id, wait=60)
    if status.state not in ("done", "failed"):
        status = ptr.client.job(job.job_id, wait=60)
    assert status.state == "done", status
    assert len(ptr.client.update(job.job_id)) > 1000


def _refusing_proxy() -> tuple[socket.socket, int]:
    """A forward proxy that refuses every CONNECT (403), on a free port: one thread, one answer per client."""
    import threading

    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_the_doctor_checks_the_outbound_path_and_names_the_hop_that_fails(fed, tmp_path):
    import shutil

    from voxgrid.nodes.ops import doctor

    def outbound(home):
        return {c.name: c for c in doctor.diagnose(home, gpu=False)}["outbound"]

    ok = outbound(fed.nodes[0].home)
    assert ok.status == "ok" and "grid TCP ok -> TLS ok -> grid ok" in ok.reason, ok
    copy = tmp_path / "node"
    shutil.copytree(fed.nodes[0].home, copy, ignore=shutil.ignore_patterns("*.db*", "cache", "blobs", "updates"))
    cfg = Home(copy).load()
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    srv, refusing = _refusing_proxy()
    try:
        for proxy, hop in [(f"http://127.0.0.1:{dead_port}", "'proxy' hop failed"),
                           (f"http://127.0.0.1:{refusing}", "'proxy CONNECT' hop failed: proxy 127.0.0.1")]:
            cfg.proxy = proxy
            Home(copy).save(cfg)
            check = outbound(copy)
            assert check.status == "fail" and hop in check.reason, check
    finally:
        srv.close()
    cfg.proxy = None
    Home(copy).save(cfg)
    (copy / cfg.grid_token_file).write_text("not-a-token\n")
    check = outbound(copy)
    assert check.status == "fail" and "'grid' hop failed" in check.reason and "401" in check.reason, check


def test_the_grid_never_holds_a_token_a_node_accepts(fed):
    import sqlite3

    from voxgrid.client import grid_credential
    from voxgrid.nodes.service.db import hash_token

    token = fed.scientist_token  # valid at the grid and at every node
    with sqlite3.connect(Home(fed.grid.home, "grid").db_file) as db:
        stored = {r[0] for r in db.execute("SELECT token_hash FROM tokens")}
    assert hash_token(token) not in stored and hash_token(grid_credential(token)) in stored
    with GridClient(fed.grid.url, token, fed.ca_cert) as grid:
        assert grid.whoami().role == "scientist"  # the client sent the grid only the credential
    with _relayed(fed, grid_credential(token)) as client, pytest.raises(voxgrid.AuthError):
        client.whoami()  # what the grid sees is refused at the node
