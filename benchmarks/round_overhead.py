"""Per-round overhead of a federated round: local compute versus everything else.

Starts a real federation on loopback (CA, grid, data nodes as separate processes over TLS, via
:class:`voxgrid.nodes.local.federation.LocalFederation`) and runs FedAvg rounds of a fixed workload
without evaluation. For each round it reports

* wall      the scientist's wall time from sending the global weights to having aggregated
            the updates (``RoundResult.train_wall_s``),
* compute   the slowest node's local compute (``metrics.compute_s``: load weights, train, delta),
* overhead  wall - compute: scheduling, serialisation, TLS transfer, the nodes' job handling,
            aggregation,

and the means over rounds, with and without round 0 (which also loads and preprocesses the
volumes at each node, a one-off cost of the warm executor).

Full size (the issue's workload): MONAI UNet (16, 32, 64, 128, 256) with strides (2, 2, 2, 2),
2 residual units (4.8M parameters), 3 nodes with 8 volumes of 64^3 each (all in the train
split), batch 2, one local epoch = 4 Adam steps (lr 1e-4, DiceCE, 1 patch of 64^3 per volume),
5 rounds, one torch thread per node. Target: overhead under 0.2 s per round.

    python benchmarks/round_overhead.py                 # full size
    python benchmarks/round_overhead.py --small --json out.json   # CI size: 32^3, 2 rounds, tiny UNet
    python benchmarks/round_overhead.py --secure        # the same rounds with secure aggregation
    python benchmarks/round_overhead.py --relay         # direct mode, then every node in outbound mode
                                                        # (through the grid's relay); last line: the ratio
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _output import write_json

TARGET_OVERHEAD_S = 0.2
LABELS = ["background", "pancreas", "tumor"]

FULL = dict(size=64, rounds=5, volumes=8, sites=3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
            res_units=2)
SMALL = dict(size=32, rounds=2, volumes=4, sites=3, channels=(8, 16, 32), strides=(2, 2), res_units=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI size: 32^3 volumes, 2 rounds, 4 volumes, tiny UNet")
    p.add_argument("--size", type=int, help="volume and patch edge in voxels (default 64; --small: 32)")
    p.add_argument("--rounds", type=int, help="rounds to run (default 5; --small: 2)")
    p.add_argument("--volumes", type=int, help="volumes per node, all in the train split (default 8; --small: 4)")
    p.add_argument("--sites", type=int, help="data nodes (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node (default 1)")
    p.add_argument("--device", default="cpu", help="node executor device: cpu, cuda or auto (default cpu)")
    p.add_argument("--secure", action="store_true",
                   help="run the rounds with secure aggregation (compare its wall time with a run without)")
    p.add_argument("--relay", action="store_true",
                   help="run the rounds twice, nodes in direct mode and then in outbound mode (reached through "
                        "the grid's relay), and compare the overheads")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the figures to this JSON file")
    p.add_argument("--root", type=Path, help="folder for the federation (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    base = SMALL if args.small else FULL
    for key in ("size", "rounds", "volumes", "sites"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.channels, args.strides, args.res_units = base["channels"], base["strides"], base["res_units"]
    if args.size < 16 or args.rounds < 1 or args.volumes < 2 or args.sites < 1:
        p.error("need --size >= 16, --rounds >= 1, --volumes >= 2 and --sites >= 1")
    return args


def make_plan(args):
    import voxgrid

    return voxgrid.unet_plan(LABELS, patch_size=(args.size,) * 3, channels=args.channels, strides=args.strides,
                             num_res_units=args.res_units, lr=1e-4, batch_size=2, samples_per_volume=1,
                             local_epochs=1, name="round-overhead")


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def summarise(rows: list[dict]) -> dict:
    def stats(sel: list[dict]) -> dict:
        wall, comp, over = ([r[k] for r in sel] for k in ("wall_s", "compute_s", "overhead_s"))
        return {"rounds": len(sel), "wall_s": _mean(wall), "compute_s": _mean(comp), "overhead_s": _mean(over),
                "overhead_median_s": statistics.median(over) if over else math.nan,
                "overhead_max_s": max(over) if over else math.nan,
                "overhead_ratio": _mean(over) / _mean(comp) if comp and _mean(comp) > 0 else math.nan}

    return {"excluding_round_0": stats(rows[1:]), "including_round_0": stats(rows)}


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def run_both(args, echo=print) -> dict:
    """Direct mode, then outbound mode, with the same workload; the ratio of their overheads."""
    figures = {}
    for mode in ("direct", "relayed"):
        echo(f"[bench] --- nodes in {'outbound mode, through the relay' if mode == 'relayed' else 'direct mode'}")
        figures[mode] = run(args, echo, outbound=mode == "relayed")
    key = "excluding_round_0" if args.rounds > 1 else "including_round_0"
    direct, relayed = (figures[m]["summary"][key]["overhead_s"] for m in ("direct", "relayed"))
    ratio = relayed / direct if direct > 0 else math.nan
    figures["relayed_over_direct"] = ratio
    echo(f"[bench] grid process peak memory: direct {figures['direct']['grid_peak_rss_mib']:.0f} MiB, "
         f"relaying {figures['relayed']['grid_peak_rss_mib']:.0f} MiB")
    echo(f"overhead per round: direct {direct * 1e3:.0f} ms, relayed {relayed * 1e3:.0f} ms; "
         f"relayed/direct {ratio:.2f} (aim: at most 1.5)")
    return figures


def run(args, echo=print, outbound: bool = False) -> dict:
    import voxgrid
    from voxgrid.datasets import default_sites
    from voxgrid.nodes.local.federation import LocalFederation

    plan = make_plan(args)
    n_params = sum(math.prod(t.shape) for t in voxgrid.plan.initial_weights(plan).values())
    # default_sites gives the third style fewer volumes; the benchmark wants the same load everywhere.
    specs = [dataclasses.replace(s, n_volumes=args.volumes)
             for s in default_sites(n_sites=args.sites, shape=(args.size,) * 3, n_volumes=args.volumes)]
    root = args.root or Path(tempfile.mkdtemp(prefix="voxgrid-bench-"))
    echo(f"[bench] {args.sites} nodes x {args.volumes} volumes of {args.size}^3, UNet {list(args.channels)} "
         f"({n_params / 1e6:.2f}M parameters), batch 2, {args.volumes // 2} steps per round, "
         f"{args.rounds} rounds, {args.threads} thread(s) per node, device {args.device}"
         f"{', secure aggregation' if args.secure else ''}")
    t0 = time.perf_counter()
    fed = LocalFederation.create(root, specs, splits=(1, 0, 0), threads=args.threads, device=args.device,
                                 outbound=tuple(s.name for s in specs) if outbound else ())
    rows: list[dict] = []
    grid_peak = math.nan
    try:
        with fed:
            fed.start()
            echo(f"[bench] federation up in {time.perf_counter() - t0:.1f} s under {root}")
            grid = fed.connect()
            try:
                pointers = grid.search("#ct")
                if len(pointers) != args.sites:
                    raise RuntimeError(f"expected {args.sites} datasets, the grid lists {len(pointers)}")
                exp = voxgrid.Experiment(plan, pointers, rounds=args.rounds, evaluate=False, name="bench",
                                         secure_aggregation=args.secure)
                echo(f"{'round':>5} {'wall ms':>10} {'compute ms':>11} {'overhead ms':>12} {'overhead/compute':>17}"
                     f"   per-node compute ms")

                def on_round(_, r):
                    row = {"round": r.round, "wall_s": r.train_wall_s, "compute_s": r.compute_s,
                           "overhead_s": r.overhead_s,
                           "ratio": r.overhead_s / r.compute_s if r.compute_s > 0 else math.nan,
                           "nodes": {s.site: {"compute_s": s.compute_s, "samples": s.samples, "loss": s.loss}
                                     for s in r.sites}, "secure_s": r.secure_s}
                    rows.append(row)
                    per_node = " ".join(f"{s.compute_s * 1e3:.0f}" for s in r.sites)
                    echo(f"{r.round:>5} {r.train_wall_s * 1e3:>10.0f} {r.compute_s * 1e3:>11.0f} "
                         f"{r.overhead_s * 1e3:>12.0f} {row['ratio']:>17.3f}   {per_node}"
                         + ("   secure ms: " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in r.secure_s.items())
                            if r.secure_s else ""))

                exp.run(progress=False, on_round=on_round)
                grid_peak = _peak_rss_mib(fed.grid.popen.pid)
            finally:
                grid.close()  # before stopping the servers: an open TLS connection delays their shutdown
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)

    summary = summarise(rows)
    for label, key in (("mean excluding round 0", "excluding_round_0"), ("mean including round 0", "including_round_0")):
        s = summary[key]
        echo(f"{label:<24} wall {s['wall_s'] * 1e3:8.0f} ms  compute {s['compute_s'] * 1e3:8.0f} ms  "
             f"overhead {s['overhead_s'] * 1e3:6.0f} ms (median {s['overhead_median_s'] * 1e3:.0f})  "
             f"overhead/compute {s['overhead_ratio']:.3f}")
    steady = summary["excluding_round_0"]["overhead_s"] if len(rows) > 1 else summary["including_round_0"]["overhead_s"]
    verdict = "meets" if steady < TARGET_OVERHEAD_S else "MISSES"
    echo(f"[bench] steady-state overhead {steady * 1e3:.0f} ms per round: {verdict} the target of "
         f"{TARGET_OVERHEAD_S * 1e3:.0f} ms")
    import torch

    return {
        "benchmark": "round_overhead",
        "config": {"size": args.size, "rounds": args.rounds, "volumes": args.volumes, "sites": args.sites,
                   "threads": args.threads, "device": args.device, "small": args.small, "secure": args.secure,
                   "channels": list(args.channels), "strides": list(args.strides), "num_res_units": args.res_units,
                   "parameters": n_params, "plan_hash": plan.content_hash},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpus": os.cpu_count()},
        "rounds": rows,
        "summary": summary,
        "target_overhead_s": TARGET_OVERHEAD_S,
        "meets_target": bool(steady < TARGET_OVERHEAD_S),
        "outbound": outbound,
        "grid_peak_rss_mib": grid_peak,
        "total_s": time.perf_counter() - t0,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    figures = run_both(args) if args.relay else run(args)
    write_json(args.json, figures, "bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
