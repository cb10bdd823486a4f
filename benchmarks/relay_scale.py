"""How many idle outbound nodes one grid process holds: memory and CPU per connected node.

Starts a real grid process (TLS, its relay) on loopback, issues N node tokens, and from this one
process opens N control links the way a node's dialer does (TLS, ``GET /v1/relay/listen``, upgraded),
answering the grid's pings. It reports the grid's resident memory and CPU before and after, per link,
and over an idle period (pings included), and checks through ``/v1/links`` that the grid holds them all.

    python benchmarks/relay_scale.py                  # 1000 links, 60 s idle
    python benchmarks/relay_scale.py --links 200 --idle 10 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _output import write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--links", type=int, default=1000, help="idle node links to open (default 1000)")
    p.add_argument("--idle", type=float, default=60.0, help="seconds to hold them idle (default 60)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the figures to this JSON file")
    return p.parse_args(argv)


def _proc(pid: int) -> tuple[float, float]:
    """(resident MiB, CPU seconds user+system) of a process."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:")) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_grid(root: Path, n: int) -> tuple[Path, list[str], Path]:
    """A CA, a grid home and ``n`` node tokens (issued in one transaction: issuing is not measured)."""
    from voxgrid.client import grid_credential
    from voxgrid.nodes.http.grid import SCHEMA
    from voxgrid.nodes.local.federation import free_port
    from voxgrid.nodes.ops import admin
    from voxgrid.nodes.service.db import Database
    from voxgrid.pki import create_ca, issue_certificate

    ca = create_ca(root / "ca")
    cert = issue_certificate(ca, root / "certs", "grid", ["127.0.0.1", "localhost"])
    home = root / "grid"
    admin.init_home("grid", home, "grid", ca_cert=ca.cert, cert=cert.cert, key=cert.key, port=free_port())
    db = Database(home / "grid.db", SCHEMA, issue_as=grid_credential)
    try:
        tokens = [db.add_token(f"load-{i:05d}", "node") for i in range(n)]
    finally:
        db.close()
    return home, tokens, ca.cert


async def hold_links(url: str, ca: Path, tokens: list[str], idle: float, on_up) -> int:
    """Open one control link per token, answer pings for ``idle`` seconds; returns how many came up."""
    from voxgrid.nodes.http.dialer import LISTEN_PATH, Route, upgrade

    links = []
    sem = asyncio.Semaphore(50)  # handshakes at once, as nodes of many sites would not all dial in one ms

    async def one(token):
        async with sem:
            reader, writer = await upgrade(Route(url, ca, token), "GET", LISTEN_PATH)
        links.append(writer)
        while line := await reader.readline():  # pong every ping, as a node does
            if b"ping" in line:
                writer.write(line.replace(b"ping", b"pong"))

    tasks = [asyncio.create_task(one(t)) for t in tokens]
    while len(links) < len(tokens) and not any(t.done() and t.exception() for t in tasks):
        await asyncio.sleep(0.2)
    failed = [t.exception() for t in tasks if t.done() and t.exception()]
    if failed:
        raise RuntimeError(f"{len(failed)} links failed; first: {failed[0]}")
    await on_up()
    await asyncio.sleep(idle)
    for w in links:
        w.close()
    return len(links)


def run(args, echo=print) -> dict:
    from voxgrid.client import GridClient

    root = Path(tempfile.mkdtemp(prefix="voxgrid-relay-scale-"))
    home, tokens, ca = make_grid(root, args.links)
    proc = subprocess.Popen([sys.executable, "-m", "voxgrid", "grid", "start", "--home", str(home)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    figures: dict = {"benchmark": "relay_scale", "links": args.links, "idle_s": args.idle}
    try:
        run_file = home / "run.json"
        while not run_file.exists():
            if proc.poll() is not None:
                raise RuntimeError("the grid exited at start")
            time.sleep(0.1)
        import json

        url = json.loads(run_file.read_text())["url"]
        owner = GridClient(url, (home / "owner.token").read_text().strip(), ca)
        rss0, cpu0 = _proc(proc.pid)
        t0 = time.perf_counter()

        async def on_up():
            up = time.perf_counter() - t0
            rss1, cpu1 = _proc(proc.pid)
            held = len(await asyncio.to_thread(owner.links))
            figures.update(connect_s=up, held=held, rss_idle_mib=rss0, rss_links_mib=rss1, cpu_connect_s=cpu1 - cpu0,
                           mib_per_link=(rss1 - rss0) / args.links, kib_per_link=(rss1 - rss0) * 1024 / args.links)
            figures["_cpu1"] = cpu1
            echo(f"[relay] {held} of {args.links} links held after {up:.1f} s; grid RSS {rss0:.0f} -> {rss1:.0f} MiB "
                 f"({figures['kib_per_link']:.1f} KiB per link); CPU to connect {cpu1 - cpu0:.2f} s")

        asyncio.run(hold_links(url, ca, tokens, args.idle, on_up))
        rss2, cpu2 = _proc(proc.pid)
        idle_cpu = cpu2 - figures.pop("_cpu1")
        figures.update(cpu_idle_s=idle_cpu, cpu_idle_percent=100 * idle_cpu / args.idle,
                       cpu_idle_us_per_link_s=1e6 * idle_cpu / args.idle / args.links, rss_end_mib=rss2)
        echo(f"[relay] idle {args.idle:.0f} s with pings: grid CPU {idle_cpu:.2f} s ({figures['cpu_idle_percent']:.2f} % "
             f"of a core; {figures['cpu_idle_us_per_link_s']:.1f} us per link per second)")
        owner.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    echo(f"one grid process held {figures['held']} idle node links: {figures['kib_per_link']:.1f} KiB and "
         f"{figures['cpu_idle_us_per_link_s']:.1f} us CPU per second each")
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    write_json(args.json, run(args), "relay")
    return 0


if __name__ == "__main__":
    sys.exit(main())
