"""A federation across hosts: a grid, three data nodes and a scientist, each in its own network namespace
with its own host name and certificate, talking TLS over veth links through a switch. One node's link is
cut while it trains round 1 and restored after: the round completes with the other two, and the node takes
part in round 2 again."""

import json
import os
import sqlite3
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netns import Lab, wait_for_file, unavailable  # test support: tests/netns.py
from voxgrid.datasets import default_sites, write_site
from voxgrid.nodes.ops import admin
from voxgrid.pki import create_ca, issue_certificate

pytestmark = pytest.mark.slow

PORT = 8443  # the same port on every host: they are separate machines as far as the network goes
JOB_TIMEOUT = 20.0  # seconds a node has to return its update before the round goes on without it
WARMUP_TIMEOUT = 120.0  # round 0 alone: each node's first job loads its data on a shared, busy machine
HTTP_TIMEOUT = 10.0

# Run in the scientist's namespace. The test opens each round's gate (go-<round>), so it can cut a link
# while round 1 is under way and restore it before round 2.
SCIENTIST = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import voxgrid

    cfg = json.loads(Path(sys.argv[1]).read_text())
    out = Path(cfg["out"])
    grid = voxgrid.connect(cfg["grid"], token=cfg["token"], ca=cfg["ca"], timeout=cfg["http_timeout"])
    deadline = time.monotonic() + 120
    while len(ptrs := grid.search("#ct")) < 3:  # nodes register as they come up
        assert time.monotonic() < deadline, f"only {len(ptrs)} datasets registered"
        time.sleep(0.5)
    try:  # a node's certificate names its host name only: dialling its address fails the TLS name check
        voxgrid.NodeClient(cfg["by_address"], cfg["token"], cfg["ca"], timeout=5).health()
        by_address = "accepted"
    except voxgrid.Unreachable as exc:
        by_address = str(exc)
    (out / "pointers.json").write_text(json.dumps({"urls": {p.node: p.url for p in ptrs}, "by_address": by_address}))
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), local_epochs=cfg["epochs"])
    exp = voxgrid.Experiment(plan, ptrs, rounds=3, min_nodes=2, job_timeout=cfg["job_timeout"], evaluate=False,
                             name="multihost")
    for rnd in range(3):
        while not (out / f"go-{rnd}").exists():
            time.sleep(0.05)
        exp.job_timeout = cfg["warmup_timeout"] if rnd == 0 else cfg["job_timeout"]
        t0 = time.monotonic()
        r = exp.run_round()
        sites = [{"node": s.node, "ok": s.ok, "error": s.error, "samples": s.samples} for s in r.sites]
        (out / f"round-{rnd}.tmp").write_text(json.dumps({"sites": sites, "wall_s": time.monotonic() - t0}))
        (out / f"round-{rnd}.tmp").rename(out / f"round-{rnd}.json")
""")


@pytest.fixture
def lab():
    why = unavailable()
    if why:
        pytest.skip(f"network namespaces cannot be made here: {why}")
    lab = Lab(prefix=f"vg{os.getpid() % 100000}")
    try:
        yield lab
    finally:
        lab.close()


def _round_job_running(db: Path, rnd: int) -> bool:
    """The node's own store says it is training this round (read from the machine, not over the network)."""
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT request, state FROM jobs").fetchall()
    finally:
        con.close()
    return any(json.loads(req)["round"] == rnd and state == "running" for req, state in rows)


@pytest.mark.timeout(300)
def test_a_node_cut_off_mid_round_is_dropped_and_rejoins_the_next_round(lab, tmp_path):
    t_start = time.monotonic()
    ca = create_ca(tmp_path / "ca")
    names = {"grid": "grid.vg.test", "node-a": "node-a.vg.test", "node-b": "node-b.vg.test",
             "node-c": "node-c.vg.test", "scientist": "lab.vg.test"}
    hosts = {role: lab.add_host(role, name) for role, name in names.items()}
    lab.up()
    grid_url = f"https://{names['grid']}:{PORT}"

    # Each server's certificate names only its own host name: TLS checks it against the name dialled.
    cert = issue_certificate(ca, tmp_path / "certs", "grid", [names["grid"]])
    ghome = tmp_path / "grid"
    admin.init_home("grid", ghome, "grid", ca_cert=ca.cert, cert=cert.cert, key=cert.key,
                    host=hosts["grid"].address, port=PORT, public_url=grid_url)
    token_file = tmp_path / "scientist.token"
    token = admin.issue_token(ghome, "grid", "scientist", "scientist", token_file)
    node_homes = {}
    site_specs = default_sites(3, shape=(32, 32, 32), n_volumes=4)
    for role, site in zip(("node-a", "node-b", "node-c"), site_specs, strict=True):
        data = write_site(site, tmp_path / "data" / site.name)
        cert = issue_certificate(ca, tmp_path / "certs", role, [names[role]])
        home = node_homes[role] = tmp_path / role
        admin.init_home("node", home, role, ca_cert=ca.cert, cert=cert.cert, key=cert.key, host=hosts[role].address,
                        port=PORT, public_url=f"https://{names[role]}:{PORT}", threads=1)
        gtoken = tmp_path / "certs" / f"{role}.grid.token"
        admin.issue_token(ghome, "grid", role, "node", gtoken)
        admin.set_grid(home, grid_url, gtoken)
        admin.add_dataset(home, site.name, data / "images", data / "labels", policy="open", tags=["ct", "pancreas"],
                          label_names=dict(site.labels), splits=(0.5, 0.25, 0.25))
        admin.issue_token(home, "node", "scientist", "scientist", token_file)

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = {}
    for role, home in [("grid", ghome), *node_homes.items()]:
        log = tmp_path / "logs" / f"{role}.log"
        kind = "grid" if role == "grid" else "node"
        procs[role] = (lab.popen(role, [sys.executable, "-m", "voxgrid", kind, "start", "--home", str(home),
                                        "--verbose"], log, env), log)
        if role == "grid":  # the nodes register as soon as they listen
            wait_for_file(ghome / "run.json", procs, 60)
    out = tmp_path / "out"
    out.mkdir()
    cfg = tmp_path / "scientist.json"
    cfg.write_text(json.dumps({"grid": grid_url, "token": token, "ca": str(ca.cert), "out": str(out),
                               "by_address": f"https://{hosts['node-a'].address}:{PORT}", "epochs": 3,
                               "job_timeout": JOB_TIMEOUT, "warmup_timeout": WARMUP_TIMEOUT,
                               "http_timeout": HTTP_TIMEOUT}))
    (tmp_path / "scientist.py").write_text(SCIENTIST)
    log = tmp_path / "logs" / "scientist.log"
    procs["scientist"] = (lab.popen("scientist", [sys.executable, str(tmp_path / "scientist.py"), str(cfg)], log,
                                    env), log)

    # The scientist found every node by its host name, over https.
    pointers = json.loads(wait_for_file(out / "pointers.json", procs, 180).read_text())
    assert pointers["urls"] == {r: f"https://{names[r]}:{PORT}" for r in ("node-a", "node-b", "node-c")}
    assert "certificate verify failed" in pointers["by_address"], pointers
    t_ready = time.monotonic() - t_start

    (out / "go-0").touch()
    r0 = json.loads(wait_for_file(out / "round-0.json", procs, WARMUP_TIMEOUT + 30).read_text())
    assert {s["node"]: s["ok"] for s in r0["sites"]} == {"node-a": True, "node-b": True, "node-c": True}, r0

    (out / "go-1").touch()
    db = node_homes["node-c"] / "node.db"
    deadline = time.monotonic() + 60
    while not _round_job_running(db, 1):
        assert time.monotonic() < deadline, "node-c never started its round-1 job"
        time.sleep(0.05)
    lab.cut("node-c")
    r1 = json.loads(wait_for_file(out / "round-1.json", procs, JOB_TIMEOUT + 3 * HTTP_TIMEOUT + 60).read_text())
    lab.restore("node-c")
    sites = {s["node"]: s for s in r1["sites"]}
    assert {n: s["ok"] for n, s in sites.items()} == {"node-a": True, "node-b": True, "node-c": False}, r1
    assert "did not finish within" in sites["node-c"]["error"] or "cannot reach" in sites["node-c"]["error"], r1
    assert sites["node-a"]["samples"] > 0 and sites["node-b"]["samples"] > 0

    (out / "go-2").touch()
    r2 = json.loads(wait_for_file(out / "round-2.json", procs, 120).read_text())
    assert {s["node"]: s["ok"] for s in r2["sites"]} == {"node-a": True, "node-b": True, "node-c": True}, r2
    assert all(s["samples"] > 0 for s in r2["sites"])
    print(f"multihost: ready {t_ready:.0f} s, rounds {r0['wall_s']:.1f} / {r1['wall_s']:.1f} / {r2['wall_s']:.1f} s, "
          f"total {time.monotonic() - t_start:.0f} s; node-c in round 1: {sites['node-c']['error']}")
