"""The multi-site studies' comparison on our phantom federation: local baselines vs federated models.

Three phantom sites built like the pancreas studies' clients (``voxgrid.datasets.default_sites``):
site-a annotates pancreas only, site-b pancreas and tumour, site-c is small and on a different
scanner. With the same plan (3-D UNet with batch norm, Dice+CE) and the same budget of local
epochs (``rounds x local_epochs`` at every site), it trains

* local baselines: each site on its own data only (best round by the site's val Dice),
* FedAvg, FedProx (mu 0.01), DWA (T=2, xi=2) and FedBN: "FL global best" (best round by the
  average over sites of the global model's val Dice) and "FL local" per site,

scores every model on every site's test split with evaluate jobs at the nodes, prints the
cross-site table (rows: models; columns: site x class, then averages) and writes it as JSON, and
checks the studies' two findings: every federated model beats every standalone model on the
average over sites, and a standalone model scores near zero on a class its site never saw.

    python benchmarks/multisite.py                        # moderate size (48^3, 8 volumes, 20 rounds; ~5 min on 2 cores)
    python benchmarks/multisite.py --small --json out.json   # CI size (32^3, 4 volumes, 2 rounds, tiny UNet)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

LABELS = ["background", "pancreas", "tumor"]
NEAR_ZERO = 0.05  # "near zero" Dice

FULL = dict(size=48, rounds=20, volumes=8, local_epochs=2, channels=(16, 32, 64, 128), strides=(2, 2, 2), res_units=1)
SMALL = dict(size=32, rounds=2, volumes=4, local_epochs=1, channels=(8, 16, 32), strides=(2, 2), res_units=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI size: 32^3, 4 volumes per site, 2 rounds, tiny UNet")
    p.add_argument("--size", type=int, help="volume and patch edge in voxels (default 48; --small: 32)")
    p.add_argument("--rounds", type=int, help="rounds (default 20; --small: 2)")
    p.add_argument("--volumes", type=int, help="volumes at sites a and b (site c gets half, at least 3)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (default 2; --small: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node (default 1)")
    p.add_argument("--device", default="cpu", help="node executor device: cpu, cuda or auto (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="OUT", help="write the table and findings to this JSON file")
    p.add_argument("--root", type=Path, help="folder for the federation (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    base = SMALL if args.small else FULL
    for key in ("size", "rounds", "volumes", "local_epochs"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.channels, args.strides, args.res_units = base["channels"], base["strides"], base["res_units"]
    if args.size < 16 or args.rounds < 1 or args.volumes < 4 or args.local_epochs < 1:
        p.error("need --size >= 16, --rounds >= 1, --volumes >= 4 and --local-epochs >= 1")
    return args


def make_plan(args):
    import voxgrid

    plan = voxgrid.unet_plan(LABELS, patch_size=(args.size,) * 3, channels=args.channels, strides=args.strides,
                             num_res_units=args.res_units, lr=2e-3, batch_size=2, samples_per_volume=4,
                             local_epochs=args.local_epochs, name="multisite")
    data = plan.model_dump(mode="json")
    data["network"]["norm"] = "batch"  # FedBN needs normalisation layers with state; every method uses the same net
    return voxgrid.Plan(**data)


def findings(table, federated: list[str], standalone: list[str]) -> dict:
    """The studies' two claims, checked on ``table`` (a CrossSiteTable)."""
    avg = {m.name: table.average(m.name) for m in table.models}
    keys = [*table.classes, "mean"]
    beats = {}
    for k in keys:
        fed = [avg[n][k] for n in federated if avg[n][k] is not None]
        loc = [avg[n][k] for n in standalone if avg[n][k] is not None]
        beats[k] = {"holds": bool(fed and loc and min(fed) > max(loc)),
                    "worst_federated": min(fed) if fed else None, "best_standalone": max(loc) if loc else None}
    unseen = []
    for m in table.models:
        if m.name not in standalone or m.site is None:
            continue
        own = table.site_classes[m.site]
        for c in table.classes:
            if c in own:
                continue
            vals = [table.dice[m.name][s].get(c) for s in table.sites if c in table.site_classes[s]]
            vals = [v for v in vals if v is not None]
            if vals:
                mean = sum(vals) / len(vals)
                unseen.append({"model": m.name, "class": c, "mean_dice_elsewhere": mean, "near_zero": mean < NEAR_ZERO})
    return {"every_federated_beats_every_standalone": beats, "standalone_on_unseen_class": unseen}


def run(args, echo=print) -> dict:
    import torch

    import voxgrid
    from voxgrid.datasets import default_sites
    from voxgrid.nodes.federation import LocalFederation

    plan = make_plan(args)
    n_params = sum(math.prod(t.shape) for t in voxgrid.plan.initial_weights(plan).values())
    specs = default_sites(n_sites=3, shape=(args.size,) * 3, n_volumes=args.volumes, seed=args.seed)
    root = args.root or Path(tempfile.mkdtemp(prefix="voxgrid-multisite-"))
    sites = ", ".join(f"{s.name} ({s.n_volumes} volumes: {'+'.join(s.labels.values())})" for s in specs)
    echo(f"[multisite] sites {sites}; "
         f"{args.size}^3, UNet {list(args.channels)} batch norm ({n_params / 1e6:.2f}M), "
         f"{args.rounds} rounds x {args.local_epochs} local epochs")
    t0 = time.perf_counter()
    timings = {}
    fed = LocalFederation.create(root, specs, threads=args.threads, device=args.device)
    try:
        with fed:
            fed.start()
            grid = fed.connect()
            try:
                pointers = grid.search("#ct", "#pancreas")
                pointers = sorted(pointers, key=lambda p: p.name)
                t = time.perf_counter()
                base = voxgrid.LocalBaselines(plan, pointers, rounds=args.rounds, seed=args.seed, name="local")
                base.run()
                models = base.models(prefix="local")
                timings["local"] = time.perf_counter() - t
                echo(f"[multisite] local baselines: {timings['local']:.1f} s")
                federated = []
                strategies = {"FedAvg": voxgrid.FedAvg(), "FedProx": voxgrid.FedProx(mu=0.01),
                              "DWA": voxgrid.DWA(T=2.0, xi=2.0), "FedBN": voxgrid.FedBN()}
                for label, strategy in strategies.items():
                    t = time.perf_counter()
                    exp = voxgrid.Experiment(plan, pointers, strategy=strategy, rounds=args.rounds, evaluate=False,
                                             select=True, seed=args.seed, name=label.lower())
                    exp.run(progress=False)
                    sel = exp.selection
                    named = [dataclasses.replace(sel.best_global, name=f"{label} global best")]
                    named += [dataclasses.replace(m, name=f"{label} local {m.site.split('@')[0]}")
                              for m in sel.models()[1:]]
                    models += named
                    federated += [m.name for m in named]
                    timings[label] = time.perf_counter() - t
                    echo(f"[multisite] {label}: {timings[label]:.1f} s, best global round {sel.best_global.round} "
                         f"(val {sel.best_global.score:.3f})")
                t = time.perf_counter()
                table = voxgrid.cross_site_evaluation(models, pointers, seed=args.seed)
                timings["cross_site_evaluation"] = time.perf_counter() - t
            finally:
                grid.close()
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)

    echo(table.render())
    standalone = [m.name for m in models if m.name.startswith("local ")]
    found = findings(table, [n for n in federated if "global" in n], standalone)
    found_local = findings(table, [n for n in federated if "global" not in n], standalone)
    for label, f in (("FL global best", found), ("FL local", found_local)):
        for k, v in f["every_federated_beats_every_standalone"].items():
            fmt = lambda x: "-" if x is None else f"{x:.3f}"
            echo(f"[multisite] every {label} model beats every local baseline on average {k}: "
                 f"{'yes' if v['holds'] else 'NO'} (worst {label} {fmt(v['worst_federated'])}, "
                 f"best local {fmt(v['best_standalone'])})")
    for u in found["standalone_on_unseen_class"]:
        echo(f"[multisite] {u['model']} on {u['class']} (never annotated at its site): mean Dice "
             f"{u['mean_dice_elsewhere']:.3f} at the sites that annotate it ({'near zero' if u['near_zero'] else 'NOT near zero'})")
    total = time.perf_counter() - t0
    echo(f"[multisite] total {total:.1f} s")
    return {
        "benchmark": "multisite",
        "config": {"size": args.size, "rounds": args.rounds, "volumes": args.volumes, "local_epochs": args.local_epochs,
                   "small": args.small, "channels": list(args.channels), "strides": list(args.strides),
                   "num_res_units": args.res_units, "parameters": n_params, "plan_hash": plan.content_hash,
                   "seed": args.seed, "device": args.device, "threads": args.threads},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "table": table.to_dict(),
        "findings": {"fl_global_best": found, "fl_local": found_local},
        "timings_s": timings, "total_s": total,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"[multisite] written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
