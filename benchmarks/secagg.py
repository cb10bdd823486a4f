"""Secure aggregation cost: per-node masking and aggregator unmasking against plain aggregation.

For each model size (float32 parameters), number of nodes and dropout fraction it runs one full
round of :mod:`voxgrid.privacy.secagg` in process (real certificates, keys, shares and masks) and
times

* mask: one node's ``mask()`` (quantise, add the self-mask and all its pairwise masks),
* aggregator: summing the survivors' masked words plus ``unmask()`` (removing self-masks and the
  dropped nodes' pairwise masks),
* plain: the weighted float32 sum of the same number of updates, what FedAvg does without it,

all in CPU seconds of this (single-threaded) process, so other load on a shared machine distorts
them less (wall times are in the JSON too), then prints a table with MB/s (of float32 parameters) and the overhead ratio, and writes JSON.
Dropped nodes share keys and then send nothing, the costlier case for the aggregator. When the
round is small enough (``--verify-limit``) every survivor masks for real and the decoded sum is
checked against the plain one; beyond that, the other survivors' inputs are copies of the timed
node's words (same cost for the aggregator, no check).

    python benchmarks/secagg.py --sizes 1e6,1e7 --nodes 3,10,50 --dropout-fraction 0,0.2 --json out.json
    python benchmarks/secagg.py --sizes 1e7 --nodes 50 --neighbours 8     # SecAgg+ sparse graph
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization

from voxgrid.pki import create_ca, issue_certificate
from voxgrid.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1e6,1e7,3e7", help="parameters per update, comma separated (default 1e6,1e7,3e7)")
    p.add_argument("--nodes", default="3,10,50", help="nodes per round, comma separated (default 3,10,50)")
    p.add_argument("--dropout-fraction", default="0,0.2",
                   help="fractions of nodes that drop after sharing keys (capped at n - threshold; default 0,0.2)")
    p.add_argument("--neighbours", type=int, default=None,
                   help="SecAgg+ neighbour-graph degree (even); default: complete graph")
    p.add_argument("--bits", type=int, default=32, choices=(32, 64), help="ring width (default 32)")
    p.add_argument("--verify-limit", type=float, default=3e8,
                   help="mask every survivor for real and check the sum when size x survivors <= this (default 3e8)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in _floats(args.sizes)]
    args.nodes = [int(n) for n in _floats(args.nodes)]
    args.dropout_fraction = _floats(args.dropout_fraction)
    if not args.sizes or min(args.sizes) < 1 or not args.nodes or min(args.nodes) < 2:
        p.error("sizes must be >= 1 and nodes >= 2")
    if any(not 0 <= f < 1 for f in args.dropout_fraction):
        p.error("dropout fractions must be in [0, 1)")
    return args


def make_pki(root: Path, n: int) -> tuple[dict[str, tuple], bytes]:
    ca = create_ca(root / "ca")
    ids = {}
    for i in range(n):
        name = f"node-{i:03d}"
        paths = issue_certificate(ca, root / "nodes", name, ["localhost"])
        ids[name] = (serialization.load_pem_private_key(paths.key.read_bytes(), password=None),
                     paths.cert.read_bytes())
    return ids, ca.cert.read_bytes()


class Timer:
    """Accumulates CPU time (the figure reported: the machine may be shared) and wall time."""

    def __init__(self):
        self.cpu = self.wall = 0.0

    def __enter__(self):
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu += time.process_time() - self._cpu
        self.wall += time.perf_counter() - self._wall


def pick_dropouts(config: SecAggConfig, count: int) -> list[str]:
    """Up to ``count`` nodes (from the end of the roster) whose loss leaves every group at least
    ``threshold`` survivors: n - t for the complete graph, fewer where SecAgg+ groups overlap."""
    groups = [set(config.neighbours_of(x)) | {x} for x in config.nodes]
    dropped: set[str] = set()
    for x in reversed(config.nodes):
        if len(dropped) == count:
            break
        if all(len(g - dropped - {x}) >= config.threshold for g in groups):
            dropped.add(x)
    return sorted(dropped)


def one_round(size: int, n: int, fraction: float, args, pki, vector: np.ndarray) -> dict:
    ids, ca_pem = pki
    names = sorted(ids)[:n]
    neighbours = args.neighbours if args.neighbours is not None and args.neighbours < n - 1 else None
    threshold = SecAggConfig.default_threshold(n, neighbours)
    config = SecAggConfig("bench", 0, tuple(names), threshold=threshold, neighbours=neighbours, bits=args.bits,
                          clip=1.0, max_weight=1.0)
    dropped = pick_dropouts(config, round(fraction * n))
    survivors = [x for x in names if x not in dropped]
    weights = {x: 0.5 + 0.5 * i / n for i, x in enumerate(names)}

    with Timer() as t_keys:  # all nodes' key and share phases together (nodes do this in parallel)
        clients = {x: SecAggClient(config, x, *ids[x], ca_pem) for x in names}
        server = SecAggServer(config, ca_pem=ca_pem)
        for c in clients.values():
            server.add_keys(c.advertise())
        roster = server.roster()
        for c in clients.values():
            server.route(c.share_keys(roster))
        inboxes = server.inboxes()
    keys_s = t_keys.cpu

    verify = size * len(survivors) <= args.verify_limit
    with Timer() as t_mask:
        words = clients[survivors[0]].mask(vector, weights[survivors[0]], inboxes[survivors[0]])
    t_sum = Timer()
    for x in survivors:
        if x == survivors[0]:
            w = words
        elif verify:
            w = clients[x].mask(vector, weights[x], inboxes[x])
        else:  # the node still masks (a token vector) so that it may reveal; the aggregator sums a copy
            clients[x].mask(vector[:1], weights[x], inboxes[x])
            w = words.copy()
        with t_sum:
            server.add_masked(x, w)
        del w
    del words
    revealed = []
    for x in survivors:
        revealed += clients[x].reveal(server.reveal_request(x))
    with Timer() as t_unmask:
        total, total_weight = server.unmask(revealed)

    acc = np.empty(size, np.float32)
    scratch = np.empty(size, np.float32)
    acc.fill(0)  # touch the pages outside the timer: plain aggregation keeps its buffers between rounds
    scratch.fill(0)
    with Timer() as t_plain:
        for x in survivors:
            np.multiply(vector, np.float32(weights[x]), out=scratch)
            acc += scratch
    del scratch
    mask_s, sum_s, unmask_s, plain_s = t_mask.cpu, t_sum.cpu, t_unmask.cpu, t_plain.cpu

    result = dict(size=size, nodes=n, threshold=threshold, neighbours=neighbours, bits=args.bits,
                  dropped=len(dropped), survivors=len(survivors), keys_s=keys_s, mask_s=mask_s,
                  mask_MBps=size * 4 / mask_s / 1e6, aggregate_sum_s=sum_s, unmask_s=unmask_s,
                  aggregator_s=sum_s + unmask_s, aggregator_MBps=size * 4 * len(survivors) / (sum_s + unmask_s) / 1e6,
                  plain_s=plain_s, plain_MBps=size * 4 * len(survivors) / plain_s / 1e6,
                  overhead_ratio=(sum_s + unmask_s) / plain_s, verified=verify,
                  wall_s=dict(mask=t_mask.wall, aggregate_sum=t_sum.wall, unmask=t_unmask.wall, plain=t_plain.wall))
    if verify:
        exact = sum(weights[x] for x in survivors) * np.clip(vector.astype(np.float64), -1, 1)
        result["max_abs_error"] = float(np.max(np.abs(total - exact)))
        result["error_bound"] = config.error_bound(len(survivors))
        result["weight_error"] = abs(total_weight - sum(weights[x] for x in survivors))
        if result["max_abs_error"] > result["error_bound"]:
            raise SystemExit(f"decoded sum off by {result['max_abs_error']} > bound {result['error_bound']}: {result}")
    return result


HEADER = (f"{'params':>10} {'nodes':>5} {'t':>3} {'drop':>4} {'keys s':>7} {'mask s':>8} {'mask MB/s':>10} "
          f"{'agg s':>8} {'agg MB/s':>9} {'plain s':>8} {'ratio':>6} {'check':>6}")


def row(r: dict) -> str:
    check = "ok" if r["verified"] else "-"
    return (f"{r['size']:>10.3g} {r['nodes']:>5} {r['threshold']:>3} {r['dropped']:>4} {r['keys_s']:>7.2f} "
            f"{r['mask_s']:>8.3f} {r['mask_MBps']:>10.0f} {r['aggregator_s']:>8.3f} {r['aggregator_MBps']:>9.0f} "
            f"{r['plain_s']:>8.3f} {r['overhead_ratio']:>6.1f} {check:>6}")


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(0)  # benchmark data only; the masks come from ChaCha20
    results = []
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp:
        pki = make_pki(Path(tmp), max(args.nodes))
        print("secure aggregation, one round in process; seconds of CPU time, MB/s of float32 parameters;\n"
              "mask = one node's mask(), agg = aggregator sum + unmask, ratio = agg / plain weighted sum")
        if args.neighbours is not None:
            print(f"SecAgg+ neighbour graph of degree {args.neighbours}")
        print(HEADER)
        for size in args.sizes:
            vector = (rng.standard_normal(size, dtype=np.float32) * 0.3)
            for n in args.nodes:
                for fraction in args.dropout_fraction:
                    r = one_round(size, n, fraction, args, pki, vector)
                    results.append(r)
                    print(row(r), flush=True)
            del vector
    out = dict(benchmark="secagg", python=sys.version.split()[0], numpy=np.__version__,
               machine=platform.machine(), processor=platform.processor(), args=dict(
                   sizes=args.sizes, nodes=args.nodes, dropout_fraction=args.dropout_fraction,
                   neighbours=args.neighbours, bits=args.bits), results=results)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
