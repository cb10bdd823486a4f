"""Outbound mode across hosts: sites that open no inbound port, reached only through the grid's relay.

Each of a grid, two data nodes, a forward proxy and a scientist runs in its own network namespace
(tests/netns.py). The nodes sit behind an inbound firewall (no TCP connection may be opened to them)
and have a route to the proxy host only: their one way to the grid is a tinyproxy that tunnels
CONNECT to the grid's port and nothing else. node-a is told its proxy in its home, with BasicAuth
credentials from a file; node-b finds its proxy in HTTPS_PROXY. The scientist runs secure-aggregation
rounds with DP through the grid's relay; the grid is SIGKILLed while round 1's jobs run and restarted
on the same port: the nodes redial by themselves, round 1 completes or fails cleanly, and round 2
runs with both sites. At the end every node's privacy ledger and audit log account for exactly the
updates that left it.

Loopback-only checks of the same mode (hostile relays, bad requests) are in tests/test_outbound.py.
"""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netns import Lab, wait_for_file, proxy_env, unavailable  # test support: tests/netns.py
from voxgrid.client import NodeClient
from voxgrid.datasets import default_sites, write_site
from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home
from voxgrid.pki import create_ca, issue_certificate

pytestmark = pytest.mark.slow

PORT = 8443  # the grid's HTTPS port: the relay is on it too
OPEN_PROXY, AUTH_PROXY = 3128, 3129  # both tinyproxies on the proxy host
PROXY_AUTH = ("site-a", "pr0xy-s3cret")
WARMUP_TIMEOUT = 150.0  # round 0: each node's first job loads its data on a shared, busy machine
JOB_TIMEOUT = 90.0  # later rounds: covers the grid's restart and the nodes' redial too
HTTP_TIMEOUT = 20.0
PRIVACY = {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}

# Run in the scientist's namespace. The test opens each step's gate (go-<step>), so it can kill the grid
# while step 1's jobs run. Every masked update the scientist fetches is written down (collected), to be
# checked against what each node's ledger and audit log say left it.
SCIENTIST = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import voxgrid

    cfg = json.loads(Path(sys.argv[1]).read_text())
    out = Path(cfg["out"])

    def write(name, data):
        (out / f"{name}.tmp").write_text(json.dumps(data))
        (out / f"{name}.tmp").rename(out / f"{name}.json")

    deadline = time.monotonic() + 150
    grid = None
    while True:  # the grid starts; nodes register (through their proxies) and link up as they come up
        try:
            grid = grid or voxgrid.connect(cfg["grid"], token=cfg["token"], ca=cfg["ca"], timeout=cfg["http_timeout"])
            ptrs = sorted(grid.search("#ct"), key=lambda p: p.node)
            if len(ptrs) == 2:
                health = {p.node: p.client.health().name for p in ptrs}  # through the relay
                break
            last = f"{len(ptrs)} datasets registered"
        except voxgrid.Unreachable as exc:
            last = str(exc)
        assert time.monotonic() < deadline, last
        time.sleep(0.5)
    write("pointers", {"urls": {p.node: p.url for p in ptrs}, "health": health})

    collected = {p.node: [] for p in ptrs}
    for p in ptrs:
        def masked(req, _fetch=p.client.secagg_masked, _node=p.node):
            words = _fetch(req)
            collected[_node].append(req.job_id)  # it left the node and reached us
            return words

        def shares(req, _send=p.client.secagg_shares, _node=p.node):
            answer = _send(req)
            (out / f"shared-{req.round}-{_node}").touch()  # the round's key agreement is done with this node
            return answer
        p.client.secagg_masked, p.client.secagg_shares = masked, shares

    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), channels=(8, 16, 32),
                             strides=(2, 2), local_epochs=1, privacy=cfg["privacy"])
    exp = voxgrid.Experiment(plan, ptrs, rounds=3, evaluate=False, seed=1, name="outbound-multihost",
                             secure_aggregation=True, threshold=2)
    for step in range(3):
        while not (out / f"go-{step}").exists():
            time.sleep(0.05)
        exp.job_timeout = cfg["warmup_timeout"] if step == 0 else cfg["job_timeout"]
        t0 = time.monotonic()
        try:
            r = exp.run_round()
            result = {"round": r.round, "sites": [{"node": s.node, "ok": s.ok, "error": s.error,
                                                   "samples": s.samples, "receipt": s.privacy} for s in r.sites]}
        except voxgrid.RoundFailed as exc:
            result = {"failed": str(exc)}
        result.update(wall_s=time.monotonic() - t0, experiment_id=exp.experiment_id,
                      collected={n: list(ids) for n, ids in collected.items()})
        write(f"step-{step}", result)
""")


@pytest.fixture
def lab():
    why = unavailable()
    if why:
        pytest.skip(f"network namespaces cannot be made here: {why}")
    missing = [c for c in ("nft", "tinyproxy") if not shutil.which(c)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup.sh installs them)")
    lab = Lab(prefix=f"vo{os.getpid() % 100000}")  # its own prefix: other lab tests may run in this process
    try:
        yield lab
    finally:
        lab.close()


def _round_jobs(db: Path, rnd: int) -> list[str]:
    """States of the node's train jobs of this round, read from its own store (not over the network)."""
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT request, state FROM jobs").fetchall()
    finally:
        con.close()
    return [state for req, state in rows if json.loads(req)["round"] == rnd and json.loads(req)["kind"] == "train"]


def _connect_error(lab: Lab, host: str, address: str, port: int, timeout: float = 1.5) -> str:
    """How a TCP connection from ``host`` to ``address:port`` fails ('connected' if it does not)."""
    with lab.socket(host) as s:
        s.settimeout(timeout)
        try:
            s.connect((address, port))
        except TimeoutError:
            return "timed out"
        except OSError as exc:
            return os.strerror(exc.errno) if exc.errno else str(exc)
    return "connected"


def _grid_status(lab: Lab, ghome: Path, env: dict) -> str:
    r = subprocess.run(lab.argv("grid", [sys.executable, "-m", "voxgrid", "grid", "status", "--home", str(ghome)]),
                       capture_output=True, text=True, timeout=60, env=env, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _wait_relinked(procs: dict, nodes: list[str], grid_url: str, timeout: float) -> None:
    """Until every node's log says it connected to the grid a second time (it redialled by itself)."""
    deadline = time.monotonic() + timeout
    while not all(procs[n][1].read_text().count(f"connected to grid {grid_url}") >= 2 for n in nodes):
        assert time.monotonic() < deadline, f"not every node redialled within {timeout} s:\n" + "\n".join(
            f"--- {n}\n{procs[n][1].read_text()[-2000:]}" for n in nodes)
        time.sleep(0.1)


def _proxy_clients(proxy) -> set[str]:
    """The addresses that opened a connection to the tinyproxy (its own readiness probe left out)."""
    return set(re.findall(r"Connect \(file descriptor \d+\): (\S+)", proxy.log.read_text())) - {proxy.address}


def _make_node_homes(lab: Lab, tmp_path: Path, ca, ghome: Path, grid_url: str, token_file: Path,
                     env: dict) -> tuple[dict, dict]:
    """Node homes made with `voxgrid node init --connect outbound`, as a site's admin would. node-a names its
    public URL and its proxy (BasicAuth credentials from a file); node-b takes the default URL
    (https://node-b:443, so its certificate names node-b) and finds its proxy in HTTPS_PROXY when it runs."""
    credentials = tmp_path / "proxy.credentials"
    credentials.write_text(f"{PROXY_AUTH[0]}:{PROXY_AUTH[1]}\n")
    public = {"node-a": f"https://{lab.hosts['node-a'].name}:443", "node-b": "https://node-b:443"}
    homes, inits = {}, []
    for role, site in zip(("node-a", "node-b"), default_sites(2, shape=(32, 32, 32), n_volumes=4), strict=True):
        data = write_site(site, tmp_path / "data" / site.name)
        cert = issue_certificate(ca, tmp_path / "certs", role, [lab.hosts[role].name if role == "node-a" else role])
        gtoken = tmp_path / "certs" / f"{role}.grid.token"
        admin.issue_token(ghome, "grid", role, "node", gtoken)
        home = homes[role] = tmp_path / role
        argv = [sys.executable, "-m", "voxgrid", "node", "init", "--home", str(home), "--name", role,
                "--ca", str(ca.cert), "--cert", str(cert.cert), "--key", str(cert.key), "--grid", grid_url,
                "--grid-token-file", str(gtoken), "--connect", "outbound", "--threads", "1"]
        if role == "node-a":
            argv += ["--proxy", f"http://{lab.hosts['proxy'].name}:{AUTH_PROXY}", "--proxy-credentials",
                     str(credentials), "--public-url", public[role]]
        inits.append((role, site, data, subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                                         stderr=subprocess.STDOUT, text=True)))
    for role, site, data, p in inits:  # both at once: the CLI takes seconds to start on a busy machine
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        admin.add_dataset(homes[role], site.name, data / "images", data / "labels", policy="open", tags=["ct", "pancreas"],
                          label_names=dict(site.labels), splits=(0.5, 0.25, 0.25))
        admin.issue_token(homes[role], "node", "scientist", "scientist", token_file)
    cfg = {role: Home(home).load() for role, home in homes.items()}
    assert cfg["node-a"].proxy == f"http://{lab.hosts['proxy'].name}:{AUTH_PROXY}", cfg
    assert cfg["node-a"].proxy_credentials_file and cfg["node-b"].proxy is None, cfg
    assert all(c.connect == "outbound" for c in cfg.values()), cfg
    return homes, public


def _check_network(lab: Lab, nodes: list[str]) -> set[str]:
    """Nobody can open a connection to a node, and a node's only way out is its proxy. Returns how the
    scientist's attempts failed."""
    seen = set()
    for role in nodes:
        addr = lab.hosts[role].address
        for port in (443, PORT):  # from the scientist: fails (dropped; or no answer at all to its ARP)
            seen.add(error := _connect_error(lab, "scientist", addr, port))
            assert error in ("timed out", "No route to host"), (role, port, error)
        # Even from the one host it has a route to: the firewall drops the SYN (a closed port would refuse it).
        assert _connect_error(lab, "proxy", addr, PORT) == "timed out", role
        # No route to the grid: the proxy's CONNECT is its way there.
        assert _connect_error(lab, role, lab.hosts["grid"].address, PORT) == "Network is unreachable", role
    return seen


def _check_ledgers(homes: dict, ca_cert: Path, steps: list[dict]) -> dict:
    """For each node: the updates that left it (its audit log's update.release lines) are exactly the masked
    updates the scientist collected, each one released in the privacy ledger first with its DP cost, and the
    ledger's released entries are exactly the experiment's finished jobs, which all left."""
    exp_id, collected = steps[-1]["experiment_id"], steps[-1]["collected"]
    summary = {}
    for role, home in homes.items():
        run = json.loads(Home(home).run_file.read_text())
        owner_token = Home(home).owner_token_file.read_text().strip()
        # The owner, on the node's machine, through its private socket (the test shares its file system).
        with NodeClient(run["url"], owner_token, ca_cert, timeout=30, uds=run["socket"]) as owner:
            jobs = [j for j in owner.jobs() if j.experiment_id == exp_id and j.kind == "train"]
            ledger = {e.job_id: e for e in owner.ledger().entries}
            audit = owner.audit(limit=2000)
        mine = {j.job_id for j in jobs}
        releases = [e.detail for e in audit if e.action == "update.release" and e.detail.split()[1] in mine]
        assert all(d.endswith(", masked") for d in releases), releases  # only ever masked
        left = [d.split()[1] for d in releases]
        assert sorted(left) == sorted(collected[role]), (role, releases, collected[role])
        for job_id in left:
            entry = ledger[job_id]
            assert entry.state == "released" and entry.dp and entry.epsilon > 0, entry
        released = {j for j in mine if j in ledger and ledger[j].state == "released"}
        assert released == {j.job_id for j in jobs if j.state == "done"} == set(left), (role, jobs, ledger, left)
        assert len(released) >= sum("failed" not in s for s in steps), (role, released)  # one per round at least
        summary[role] = f"{len(jobs)} train jobs, {len(released)} released in the ledger, {len(left)} releases"
    return summary


@pytest.mark.timeout(420)
def test_outbound_nodes_behind_proxies_survive_a_grid_crash_and_account_for_every_release(lab, tmp_path):
    t_start = time.monotonic()
    ca = create_ca(tmp_path / "ca")
    for role, name in {"grid": "grid.vg.test", "node-a": "node-a.vg.test", "node-b": "node-b.vg.test",
                       "proxy": "proxy.vg.test", "scientist": "lab.vg.test"}.items():
        lab.add_host(role, name)
    lab.up()
    nodes = ["node-a", "node-b"]
    for role in nodes:
        lab.firewall_inbound(role)
        lab.route_only(role, ["proxy"])  # the site's only way out is its proxy
    open_proxy = lab.proxy("proxy", OPEN_PROXY, tmp_path / "proxy", [PORT])
    auth_proxy = lab.proxy("proxy", AUTH_PROXY, tmp_path / "proxy", [PORT], auth=PROXY_AUTH)
    grid = lab.hosts["grid"]
    grid_url = f"https://{grid.name}:{PORT}"
    # No proxy variables from the machine: each process gets exactly the ones the test means it to.
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

    cert = issue_certificate(ca, tmp_path / "certs", "grid", [grid.name])
    ghome = tmp_path / "grid"
    admin.init_home("grid", ghome, "grid", ca_cert=ca.cert, cert=cert.cert, key=cert.key, host=grid.address,
                    port=PORT, public_url=grid_url)
    token_file = tmp_path / "scientist.token"
    token = admin.issue_token(ghome, "grid", "scientist", "scientist", token_file)
    procs: dict = {}

    def start(role: str, argv: list[str], role_env: dict = env) -> None:
        log = tmp_path / "logs" / f"{role}.log"
        procs[role] = (lab.popen(role, [sys.executable, *argv], log, role_env), log)

    def start_grid() -> None:
        Home(ghome, "grid").run_file.unlink(missing_ok=True)
        start("grid", ["-m", "voxgrid", "grid", "start", "--home", str(ghome), "--verbose"])

    # The grid and the scientist boot while the sites are set up (every start takes seconds here).
    start_grid()
    out = tmp_path / "out"
    out.mkdir()
    cfg = tmp_path / "scientist.json"
    cfg.write_text(json.dumps({"grid": grid_url, "token": token, "ca": str(ca.cert), "out": str(out),
                               "privacy": PRIVACY, "job_timeout": JOB_TIMEOUT, "warmup_timeout": WARMUP_TIMEOUT,
                               "http_timeout": HTTP_TIMEOUT}))
    (tmp_path / "scientist.py").write_text(SCIENTIST)
    start("scientist", [str(tmp_path / "scientist.py"), str(cfg)])
    homes, public = _make_node_homes(lab, tmp_path, ca, ghome, grid_url, token_file, env)
    wait_for_file(Home(ghome, "grid").run_file, procs, 60)
    node_env = {"node-a": env, "node-b": proxy_env(open_proxy.url, env)}
    for role in nodes:
        start(role, ["-m", "voxgrid", "node", "start", "--home", str(homes[role]), "--verbose"], node_env[role])

    refused = _check_network(lab, nodes)  # while the nodes boot
    for role in nodes:
        run = json.loads(wait_for_file(Home(homes[role]).run_file, procs, 180).read_text())
        assert run["connect"] == "outbound" and run["url"] == public[role], run
        # nothing on a network interface; the owner console alone, on loopback, where its run file says
        listening = subprocess.run(lab.argv(role, ["ss", "-ltnH"]), capture_output=True, text=True, check=True)
        local = [line.split()[3] for line in listening.stdout.splitlines()]
        console = run.get("console", "").removeprefix("https://").rstrip("/")
        assert local in ([], [console]) and all(a.startswith("127.0.0.1:") for a in local), \
            f"{role} listens on TCP:\n{listening.stdout}"
    # The scientist found both nodes by their public URLs and reached each through the relay.
    pointers = json.loads(wait_for_file(out / "pointers.json", procs, 180).read_text())
    assert pointers == {"urls": public, "health": {"node-a": "node-a", "node-b": "node-b"}}, pointers
    t_ready = time.monotonic() - t_start

    # Step 0: one secure DP round, both sites.
    (out / "go-0").touch()
    s0 = json.loads(wait_for_file(out / "step-0.json", procs, WARMUP_TIMEOUT + 60).read_text())
    assert "failed" not in s0, s0
    assert {s["node"]: s["ok"] for s in s0["sites"]} == {"node-a": True, "node-b": True}, s0
    assert all(s["receipt"]["dp"] and s["receipt"]["epsilon"] > 0 for s in s0["sites"]), s0

    # Step 1: the grid dies (SIGKILL) while the round's jobs run (their keys agreed: the scientist now waits for
    # the jobs through the relay), and comes back on its port.
    (out / "go-1").touch()
    wait_for_file(out / "shared-1-node-a", procs, 60)
    wait_for_file(out / "shared-1-node-b", procs, 60)
    at_kill = {role: _round_jobs(Home(h).db_file, 1) for role, h in homes.items()}
    os.killpg(procs["grid"][0].pid, signal.SIGKILL)
    procs["grid"][0].wait()
    t_kill = time.monotonic()
    assert not (out / "step-1.json").exists(), "the grid was killed after round 1, not during it"
    start_grid()
    wait_for_file(Home(ghome, "grid").run_file, procs, 60)
    t_down = time.monotonic() - t_kill
    _wait_relinked(procs, nodes, grid_url, 90)  # the nodes redial by themselves, with backoff
    t_relinked = time.monotonic() - t_kill
    s1 = json.loads(wait_for_file(out / "step-1.json", procs, JOB_TIMEOUT + 90).read_text())
    if "failed" in s1:  # a clean failure: the round says which nodes it lost and why
        assert s1["failed"].startswith("round 1: only") and "min_nodes=2" in s1["failed"], s1
    else:
        assert {s["node"]: s["ok"] for s in s1["sites"]} == {"node-a": True, "node-b": True}, s1

    # Step 2: the next round runs with both sites.
    (out / "go-2").touch()
    s2 = json.loads(wait_for_file(out / "step-2.json", procs, JOB_TIMEOUT + 60).read_text())
    assert "failed" not in s2, s2
    assert {s["node"]: s["ok"] for s in s2["sites"]} == {"node-a": True, "node-b": True}, s2
    assert all(s["samples"] > 0 and s["receipt"]["dp"] for s in s2["sites"]), s2

    # The grid's operator sees both links, made through the proxy host; each node used its own proxy.
    status = _grid_status(lab, ghome, env)
    for role in nodes:
        assert re.search(rf"^{role}: connected since .* from {re.escape(open_proxy.address)}:\d+;", status, re.M), \
            status
    assert _proxy_clients(auth_proxy) == {lab.hosts["node-a"].address}
    assert _proxy_clients(open_proxy) == {lab.hosts["node-b"].address}

    # Step 3: what left each node is what its ledger and audit log say left, and what the scientist got.
    summary = _check_ledgers(homes, ca.cert, [s0, s1, s2])
    print(f"multihost outbound: scientist -> nodes: {refused}; ready {t_ready:.0f} s; rounds {s0['wall_s']:.1f} / "
          f"{s1['wall_s']:.1f} / {s2['wall_s']:.1f} s; grid killed with round-1 jobs {at_kill}, up again "
          f"{t_down:.1f} s later, both nodes relinked {t_relinked:.1f} s after the kill; round 1: "
          f"{s1.get('failed') or 'both sites ok'}; {summary}; total {time.monotonic() - t_start:.0f} s")
