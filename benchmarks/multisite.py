"""The multi-site studies' comparison on our phantom federation: local baselines vs federated models.

Three phantom sites built like the pancreas studies' clients (``voxgrid.datasets.default_sites``):
site-a annotates pancreas only (and shows no tumours), site-b pancreas and tumour, site-c pancreas
and tumour on a different scanner. By default (``--composition studies``) the tumour sites hold 3/4
of the cases (a:b:c = 1:2:1), as in the studies; ``--composition even`` is default_sites' 1:1:1/2.
With the same plan (3-D UNet with batch norm, Dice+CE) and the same budget of local epochs
(``rounds x local_epochs`` at every site), it trains

* local baselines: each site on its own data only (best round by the site's val Dice),
* FedAvg, FedProx (mu 0.01), DWA (T=2, xi=2), DWA+DTP (DWA with dynamic task prioritisation at
  the clients, the multi-task pancreas study's combination), FedBN, and MT-heads (FedAvg of the
  body, each site keeping its own task head, UNet's last block): "FL global best" (best round by
  the average over sites of the global model's val Dice) and "FL local" per site,
* FedBN+FT: the FedBN federation's final model fine-tuned at each site for ``local_epochs`` more
  local epochs (``voxgrid.baselines.finetune``),
* Cyclic: cyclic weight transfer (``voxgrid.Cyclic``, shuffled order each round, one pass): the model
  visits the sites in turn, each training ``local_epochs`` epochs from where the previous one stopped,
* pooled: the same plan trained in one process on the union of every site's training split
  (``pooled.py``; possible only because the benchmark owns every phantom site), the reference the
  studies measure federated models against,

scores every model on every site's test split with evaluate jobs at the nodes, prints the
cross-site table (rows: models; columns: site x class, then averages) and writes it as JSON, and
checks the studies' two findings: every federated model beats every standalone model on the
average over sites, and a standalone model scores near zero on a class its site never saw. It prints
each federated model's average mean Dice as a fraction of the pooled model's and ends with the best
federated global model's fraction (the studies: 0.986 for JIP, 0.852 / 0.862 for the brain tumour work).
With several ``--seeds`` (each a fresh federation: new phantoms, new initial weights) it also
prints the findings per seed and each model's mean over seeds.

    python benchmarks/multisite.py                        # default (32^3, 6/12/6 volumes, 10 rounds x 2 epochs)
    python benchmarks/multisite.py --small --json out.json   # CI size (32^3, 4/8/4 volumes, 2 rounds, tiny UNet)
    python benchmarks/multisite.py --small --rounds 6 --seeds 0 1 2 --methods FedAvg DWA+DTP FedBN FedBN+FT
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _output import write_json

LABELS = ["background", "pancreas", "tumor"]
NEAR_ZERO = 0.05  # "near zero" Dice
METHODS = ["FedAvg", "FedProx", "DWA", "DWA+DTP", "FedBN", "MT-heads", "Cyclic", "FedBN+FT"]
# DTP: gamma 2 as in focal loss; alpha 0.3 averages over a few batches; r 1 (Dice itself)
DTP = {"gamma": 2.0, "alpha": 0.3, "r": 1.0}
HEAD = ["model.2"]  # MONAI UNet's last up-sampling block: the task head of the multi-task setup

FULL = {"size": 32, "rounds": 10, "volumes": 6, "local_epochs": 2, "channels": (16, 32, 64, 128), "strides": (2, 2, 2),
        "res_units": 1}
SMALL = {"size": 32, "rounds": 2, "volumes": 4, "local_epochs": 1, "channels": (8, 16, 32), "strides": (2, 2),
         "res_units": 0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI size: 32^3, 4/8/4 volumes, 2 rounds, tiny UNet")
    p.add_argument("--size", type=int, help="volume and patch edge in voxels (default 32)")
    p.add_argument("--rounds", type=int, help="rounds (default 10; --small: 2)")
    p.add_argument("--volumes", type=int, help="volumes at sites a and c; site b gets twice as many (--composition "
                   "studies), or sites a and b get it and site c half (--composition even)")
    p.add_argument("--composition", choices=["studies", "even"], default="studies",
                   help="studies (default): the sites that annotate the tumour hold 3/4 of the cases, as in the "
                        "pancreas studies; even: voxgrid.datasets.default_sites (a pancreas-only site as large as b)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (default 2; --small: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node (default 1)")
    p.add_argument("--device", default="cpu", help="node executor device: cpu, cuda or auto (default cpu)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="one run per seed, each a fresh federation (default: 0)")
    p.add_argument("--seed", type=int, help="a single seed: the same as --seeds SEED")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, metavar="METHOD",
                   help=f"federated methods to run besides the local baselines (default: all of {' '.join(METHODS)})")
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
    if args.seed is not None:
        args.seeds = [args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must differ, got {args.seeds}")
    if "FedBN+FT" in args.methods and "FedBN" not in args.methods:
        args.methods = [*args.methods, "FedBN"]  # fine-tuning starts from the FedBN federation
    return args


def benchmark_sites(args, seed: int):
    """The three phantom sites. ``even`` is ``default_sites``: site a (pancreas only, no tumours) as large
    as site b, site c half of it. ``studies`` gives sites a and c ``volumes`` cases and site b twice
    as many, so the sites that annotate the tumour hold 3/4 of the cases and every one of them has
    tumour-bearing training volumes, as in the pancreas studies (NIH's 82 pancreas-only cases beside
    MSD's 281 with tumours). With ``even`` the pancreas-only site holds 40 % of the training samples
    and its FedAvg share erases what the others learn of the tumour (README, "Why the federated
    models missed the tumour")."""
    from voxgrid.datasets import default_sites

    specs = default_sites(n_sites=3, shape=(args.size,) * 3, n_volumes=args.volumes, seed=seed)
    if args.composition == "even":
        return specs
    return [dataclasses.replace(s, n_volumes=n) for s, n in zip(specs, (args.volumes, 2 * args.volumes, args.volumes),
                                                               strict=True)]


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


def strategy_for(label: str, plan):
    """The strategy and plan of one federated method."""
    import voxgrid

    if label == "FedAvg":
        return voxgrid.FedAvg(), plan
    if label == "FedProx":
        return voxgrid.FedProx(mu=0.01), plan
    if label == "DWA":
        return voxgrid.DWA(T=2.0), plan  # xi = 1 (the default): a convex combination; xi = 2 overshot (README)
    if label == "DWA+DTP":
        return voxgrid.DWA(T=2.0), plan.with_local(dtp=DTP)
    if label == "FedBN":
        return voxgrid.FedBN(), plan
    if label == "MT-heads":
        return voxgrid.FedAvg(), plan.with_local(keep_local=["head"], head=HEAD)
    if label == "Cyclic":
        return voxgrid.Cyclic(order="shuffle"), plan
    raise ValueError(f"unknown method {label!r}")


def run(args, echo=print) -> dict:
    """One run per seed, then the findings per seed and each model's mean over seeds."""
    import torch

    runs = []
    for seed in args.seeds:
        root = args.root / f"seed-{seed}" if args.root and len(args.seeds) > 1 else args.root
        runs.append(run_seed(args, seed, root, echo))
    summary = summarise(runs)
    if len(runs) > 1:
        echo(render_summary(summary, args.seeds))
    summary["best_global_vs_pooled"] = best_global_fraction(runs)  # main prints it last
    first = runs[0]
    return {
        "benchmark": "multisite",
        "config": {"size": args.size, "rounds": args.rounds, "volumes": args.volumes, "local_epochs": args.local_epochs,
                   "composition": args.composition,
                   "small": args.small, "channels": list(args.channels), "strides": list(args.strides),
                   "num_res_units": args.res_units, "parameters": first["parameters"], "plan_hash": first["plan_hash"],
                   "seeds": list(args.seeds), "methods": list(args.methods), "dtp": DTP, "head": HEAD,
                   "device": args.device, "threads": args.threads},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        # the first seed's table and findings, as before; every seed's under "runs"
        "table": first["table"], "findings": first["findings"],
        "runs": runs, "summary": summary,
        "total_s": sum(r["total_s"] for r in runs),
    }


GROUPS = ("fl_global_best", "fl_local", "fl_finetuned")


def summarise(runs: list[dict]) -> dict:
    """Per model, the mean over seeds of its average-over-sites Dice; per finding, in how many seeds it held."""
    models: dict[str, list[float]] = {}
    for r in runs:
        for m in r["table"]["models"]:
            v = m["average"].get("mean")
            if v is not None:
                models.setdefault(m["name"], []).append(v)
    mean_of = {n: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "n": len(v)} for n, v in models.items()}
    # per federated model: in how many seeds its average mean Dice beat every local baseline's
    beats: dict[str, int] = {}
    for r in runs:
        avg = {m["name"]: m["average"].get("mean") for m in r["table"]["models"]}
        local = [v for n, v in avg.items() if n.startswith("local ") and v is not None]
        for n, v in avg.items():
            if not n.startswith("local ") and n != "pooled":
                beats[n] = beats.get(n, 0) + int(v is not None and bool(local) and v > max(local))
    for n, k in beats.items():
        if n in mean_of:
            mean_of[n]["seeds_beating_every_local"] = k
    holds = {}
    for g in GROUPS:
        per_seed = [r["findings"][g]["every_federated_beats_every_standalone"]["mean"]["holds"]
                    for r in runs if g in r["findings"]]
        holds[g] = {"seeds_holding": sum(per_seed), "seeds": len(per_seed)}
    unseen: dict[str, list[float]] = {}
    for r in runs:
        for u in r["findings"]["fl_global_best"]["standalone_on_unseen_class"]:
            unseen.setdefault(f"{u['model']} on {u['class']}", []).append(u["mean_dice_elsewhere"])
    return {"average_mean_dice": mean_of, "every_federated_beats_every_standalone": holds,
            "standalone_on_unseen_class": {k: {"mean": sum(v) / len(v), "max": max(v), "values": v}
                                           for k, v in unseen.items()}}


def render_summary(summary: dict, seeds: list[int]) -> str:
    lines = [f"[multisite] over seeds {seeds}: average-over-sites mean Dice per model (mean [min, max])"]
    for name, v in summary["average_mean_dice"].items():
        beat = v.get("seeds_beating_every_local")
        lines.append(f"  {name:<24} {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"
                     + ("" if beat is None else f"  beats every local baseline in {beat} of {v['n']} seeds"))
    for g, v in summary["every_federated_beats_every_standalone"].items():
        if v["seeds"]:
            lines.append(f"[multisite] every {g} model beats every local baseline (average mean Dice): "
                         f"{v['seeds_holding']} of {v['seeds']} seeds")
    for k, v in summary["standalone_on_unseen_class"].items():
        lines.append(f"[multisite] {k} (never annotated at its site): mean Dice {v['mean']:.3f}, "
                     f"max {v['max']:.3f} over seeds")
    return "\n".join(lines)


def run_seed(args, seed: int, root: Path | None, echo=print) -> dict:
    """One federation (phantoms and initial weights from ``seed``), every method, the cross-site table."""
    import voxgrid
    from voxgrid.baselines import finetune
    from voxgrid.nodes.local.federation import LocalFederation

    plan = make_plan(args)
    n_params = sum(math.prod(t.shape) for t in voxgrid.plan.initial_weights(plan).values())
    specs = benchmark_sites(args, seed)
    keep = root is not None
    root = root or Path(tempfile.mkdtemp(prefix="voxgrid-multisite-"))
    sites = ", ".join(f"{s.name} ({s.n_volumes} volumes: {'+'.join(s.labels.values())})" for s in specs)
    echo(f"[multisite] seed {seed}: sites {sites}; "
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
                base = voxgrid.LocalBaselines(plan, pointers, rounds=args.rounds, seed=seed, name="local")
                base.run()
                models = base.models(prefix="local")
                timings["local"] = time.perf_counter() - t
                echo(f"[multisite] local baselines: {timings['local']:.1f} s")
                t = time.perf_counter()
                models.append(pooled_model(plan, fed, specs, args, seed))
                timings["pooled"] = time.perf_counter() - t
                echo(f"[multisite] pooled: {timings['pooled']:.1f} s, best round {models[-1].round} "
                     f"(val {models[-1].score:.3f})")
                federated, finetuned = [], []
                for label in [m for m in METHODS if m in args.methods and m != "FedBN+FT"]:
                    t = time.perf_counter()
                    strategy, method_plan = strategy_for(label, plan)
                    exp = voxgrid.Experiment(method_plan, pointers, strategy=strategy, rounds=args.rounds,
                                             evaluate=False, select=True, seed=seed,
                                             name=label.lower().replace("+", "-"))
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
                    if label == "FedBN" and "FedBN+FT" in args.methods:
                        t = time.perf_counter()
                        ft = finetune(exp, epochs=args.local_epochs, prefix="FedBN+FT")
                        models += ft
                        finetuned += [m.name for m in ft]
                        timings["FedBN+FT"] = time.perf_counter() - t
                        echo(f"[multisite] FedBN+FT: {timings['FedBN+FT']:.1f} s")
                t = time.perf_counter()
                table = voxgrid.cross_site_evaluation(models, pointers, seed=seed)
                timings["cross_site_evaluation"] = time.perf_counter() - t
            finally:
                grid.close()
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

    echo(table.render())
    standalone = [m.name for m in models if m.name.startswith("local ")]
    found = findings(table, [n for n in federated if "global" in n], standalone)
    found_local = findings(table, [n for n in federated if "global" not in n], standalone)
    groups = [("FL global best", found), ("FL local", found_local)]
    out_findings = {"fl_global_best": found, "fl_local": found_local}
    if finetuned:
        out_findings["fl_finetuned"] = findings(table, finetuned, standalone)
        groups.append(("FL + fine-tune", out_findings["fl_finetuned"]))
    for label, f in groups:
        for k, v in f["every_federated_beats_every_standalone"].items():
            fmt = lambda x: "-" if x is None else f"{x:.3f}"
            echo(f"[multisite] every {label} model beats every local baseline on average {k}: "
                 f"{'yes' if v['holds'] else 'NO'} (worst {label} {fmt(v['worst_federated'])}, "
                 f"best local {fmt(v['best_standalone'])})")
    for u in found["standalone_on_unseen_class"]:
        echo(f"[multisite] {u['model']} on {u['class']} (never annotated at its site): mean Dice "
             f"{u['mean_dice_elsewhere']:.3f} at the sites that annotate it ({'near zero' if u['near_zero'] else 'NOT near zero'})")
    ratios = pooled_ratios(table, federated + finetuned)
    for name, r in ratios.items():
        echo(f"[multisite] {name}: average mean Dice {r['mean']:.3f} = {r['ratio']:.3f} x pooled ({r['pooled']:.3f})")
    total = time.perf_counter() - t0
    echo(f"[multisite] seed {seed}: total {total:.1f} s")
    return {"seed": seed, "parameters": n_params, "plan_hash": plan.content_hash, "table": table.to_dict(),
            "findings": out_findings, "pooled_ratio": ratios, "timings_s": timings, "total_s": total}


def pooled_model(plan, fed, specs, args, seed: int):
    """The pooled baseline (:mod:`pooled`) as a model for the cross-site table, named ``pooled``."""
    from pooled import check_poolable, pooled_data, train_pooled

    import voxgrid

    check_poolable(specs)
    data = pooled_data({s.name: p.home for s, p in zip(specs, fed.nodes, strict=True)}, plan)
    # the nodes are idle while it trains: it may use their threads
    weights, rnd, score, _ = train_pooled(plan, data, rounds=args.rounds, seed=seed, device=args.device,
                                          threads=min(os.cpu_count() or 1, 3 * args.threads))
    return voxgrid.SelectedModel("pooled", weights, plan, f"pooled-{seed}", rnd, score)


def pooled_ratios(table, federated: list[str]) -> dict:
    """Per federated model, its average-over-sites mean Dice and that as a fraction of the pooled model's."""
    pooled = table.average("pooled")["mean"]
    out = {}
    for name in federated:
        mean = table.average(name)["mean"]
        if mean is not None and pooled:
            out[name] = {"mean": mean, "pooled": pooled, "ratio": mean / pooled}
    return out


def best_global_fraction(runs: list[dict]) -> dict:
    """Per seed, the best federated global model's fraction of the pooled model's mean Dice; their mean."""
    per_seed = []
    for r in runs:
        best = max(((n, v) for n, v in r["pooled_ratio"].items() if n.endswith(" global best")),
                   key=lambda kv: kv[1]["ratio"], default=None)
        if best is not None:
            per_seed.append({"seed": r["seed"], "model": best[0], **best[1]})
    mean = sum(b["ratio"] for b in per_seed) / len(per_seed) if per_seed else None
    return {"per_seed": per_seed, "mean": mean}


def render_fraction(frac: dict) -> str:
    """The benchmark's last line."""
    if frac["mean"] is None:
        return "[multisite] best federated global model / pooled: - (no federated global model was scored)"
    seeds = "; ".join(f"seed {b['seed']}: {b['model'].removesuffix(' global best')} {b['mean']:.3f} / "
                      f"{b['pooled']:.3f} = {b['ratio']:.3f}" for b in frac["per_seed"])
    return f"[multisite] best federated global model's mean Dice / pooled model's: {frac['mean']:.3f} ({seeds})"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = run(args)
    write_json(args.json, out, "multisite")
    print(render_fraction(out["summary"]["best_global_vs_pooled"]))  # the last line, as the issue asks
    return 0


if __name__ == "__main__":
    sys.exit(main())
