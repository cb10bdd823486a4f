"""Does DP-SGD learn? Public pretraining, then private federated fine-tuning, on phantom sites of realistic size.

A "public" phantom set from another scanner (finer voxel spacing, other HU calibration) is what the
scientist holds: the plan's network is pretrained on it in this process (:func:`voxgrid.pretrain`).
Then a real federation on loopback (:class:`voxgrid.nodes.local.federation.LocalFederation`: CA,
grid, one node process per site; 3 sites of ``--patients`` train patients each, small volumes)
fine-tunes it with FedAvg from those weights:

* public only: the pretrained weights, not fine-tuned;
* DP-FL at each target epsilon (delta 1e-5), all parameters and the head only (``plan.local.train_only``):
  patient-level DP-SGD at the nodes, the plan stating ``target_epsilon`` and the rounds; each node
  derives its noise multiplier with the accountant; augmentation multiplicity K, group norm, large
  expected batches (Poisson rate q), few steps;
* non-private FL, the same rounds.

The table: Dice per site and class on each site's test split, the mean, the epsilon the nodes'
receipts state, and the share of the gap between public-only and non-private FL that each DP run
closes. The last line is that share for the reference run (all parameters, the largest epsilon).
It also times one local training step with and without DP-SGD (the issue's target: DP-SGD at most
2 times a plain step on CPU).

    python benchmarks/privacy_utility.py                          # defaults (about 20 min on 2 CPU cores)
    python benchmarks/privacy_utility.py --small --json out.json  # CI size (about a minute)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _output import write_json

LABELS = ["background", "pancreas"]
TIMING_LABELS = ["background", "pancreas", "tumor"]
DELTA = 1e-5
TARGET_SLOWDOWN = 2.0
TIMING_REPEATS = 3

FULL = dict(size=24, patch=16, patients=100, test=20, public=60, pretrain_epochs=30, rounds=5, sample_rate=0.5,
            multiplicity=4, lr=3e-3, channels=(8, 16, 32), strides=(2, 2), res_units=1, timing_steps=10)
SMALL = dict(size=16, patch=16, patients=8, test=4, public=8, pretrain_epochs=2, rounds=1, sample_rate=0.5,
             multiplicity=2, lr=3e-3, channels=(4, 8), strides=(2,), res_units=0, timing_steps=2)
#: the skeleton's benchmark UNet (benchmarks/round_overhead.py), for the step timing
TIMING_NET = dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), res_units=2)
#: Scanner calibrations (HU offset, scale, noise sd) of the sites, and the public set's scanner:
#: other calibration *and* finer voxels, so its anatomy looks larger (group norm absorbs calibration alone).
SITE_SCANNERS = [(0.0, 1.0, 10.0), (30.0, 1.1, 15.0), (60.0, 1.2, 20.0)]
PUBLIC_SCANNER = dict(hu_offset=-40.0, hu_scale=0.9, noise_sd=25.0, spacing=(1.2, 1.2, 1.6))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI size: 16^3, 8 patients a site, 1 round, tiny UNet")
    for name, kind, what in [("size", int, "volume edge in voxels"), ("patch", int, "patch edge in voxels"),
                             ("patients", int, "train patients per site"), ("test", int, "test patients per site"),
                             ("public", int, "public volumes for pretraining"),
                             ("pretrain-epochs", int, "pretraining epochs"), ("rounds", int, "federated rounds"),
                             ("sample-rate", float, "DP-SGD's Poisson rate q (expected batch q * patients)"),
                             ("multiplicity", int, "augmented patches per patient per DP step (K)"),
                             ("lr", float, "Adam's learning rate, fine-tuning")]:
        p.add_argument(f"--{name}", type=kind, help=f"{what} (default {FULL[name.replace('-', '_')]}; "
                                                    f"--small: {SMALL[name.replace('-', '_')]})")
    p.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 4.0, 8.0],
                   help="target epsilons (default: 1 4 8), each a DP-FL run of all parameters and one of the head")
    p.add_argument("--no-head", action="store_true", help="skip the head-only DP runs")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD's per-patient clip (default 1)")
    p.add_argument("--timing-size", type=int, default=32, help="patch edge for the step timing (default 32)")
    p.add_argument("--timing-steps", type=int, help="timed steps each way (default 10; --small: 2); 0 skips it")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node (default 1)")
    p.add_argument("--device", default="cpu", help="device: cpu, cuda or auto (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="OUT", help="write the figures to this JSON file")
    p.add_argument("--root", type=Path, help="folder for the federation (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    base = SMALL if args.small else FULL
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.size < 16 or args.patch < 8 or args.patch > args.size or args.rounds < 1 or args.patients < 2:
        p.error("need --size >= 16, 8 <= --patch <= --size, --rounds >= 1 and --patients >= 2")
    if args.test < 1 or args.public < 1 or args.pretrain_epochs < 1 or not 1 <= args.multiplicity <= 32:
        p.error("need --test >= 1, --public >= 1, --pretrain-epochs >= 1 and 1 <= --multiplicity <= 32")
    if any(not (0 < e <= 100) for e in args.epsilons) or not 0 < args.sample_rate <= 1:
        p.error(f"--epsilons must be in (0, 100] and --sample-rate in (0, 1], got {args.epsilons}, {args.sample_rate}")
    if args.timing_steps < 0 or args.max_grad_norm <= 0:
        p.error("need --timing-steps >= 0 and --max-grad-norm > 0")
    if args.timing_size < 32 or args.timing_size % 16:
        p.error(f"--timing-size must be a multiple of 16, at least 32 (the timed UNet halves it 4 times), "
                f"got {args.timing_size}")
    return args


def make_plan(args, privacy=None, train_only=()):
    """Group norm (2 groups), DiceCE, Adam; patches smaller than the volume so K views differ, plus intensity jitter."""
    import voxgrid

    augmentation = [{"_target_": "RandScaleIntensityd", "keys": ["image"], "factors": 0.1, "prob": 0.5},
                    {"_target_": "RandShiftIntensityd", "keys": ["image"], "offsets": 0.05, "prob": 0.5}]
    plan = voxgrid.unet_plan(LABELS, patch_size=(args.patch,) * 3, channels=args.channels, strides=args.strides,
                             num_res_units=args.res_units, lr=args.lr, norm="group", norm_groups=2, batch_size=8,
                             samples_per_volume=1, local_epochs=1, amp=False, augmentation=augmentation,
                             name="privacy-utility", privacy=privacy)
    return plan.with_local(train_only=list(train_only)) if train_only else plan


def dp_sgd_spec(args, target: float) -> dict:
    """DP-SGD stated as a privacy target: each node derives its noise multiplier for the planned rounds."""
    return {"mechanism": "dp_sgd", "target_epsilon": target, "rounds": args.rounds, "delta": DELTA,
            "max_grad_norm": args.max_grad_norm, "sample_rate": args.sample_rate,
            "augmentation_multiplicity": args.multiplicity}


def head_prefix(plan) -> str:
    """The state-dict prefix of MONAI UNet's last up-sampling block (the head)."""
    from voxgrid.plan import build_network
    import torch

    with torch.device("meta"):
        names = list(build_network(plan).state_dict())
    return ".".join(names[-1].split(".")[:2])  # e.g. "model.2"


def sites(args):
    """The federation's sites (pancreas labels, three scanners) and the public scanner's volumes."""
    from voxgrid.datasets import make_phantom
    from voxgrid.datasets.phantoms import SiteSpec

    n = math.ceil((args.patients + args.test) / 0.9)  # splits 0.8 / 0.1 / 0.1 would leave too few test cases
    specs = [SiteSpec(name=f"site-{chr(97 + i)}", n_volumes=n, labels={1: "pancreas", 2: "tumor"}, shape=(args.size,) * 3,
                      hu_offset=o, hu_scale=k, noise_sd=sd, tumor=True, seed=args.seed * 1009 + 101 * i + 7)
             for i, (o, k, sd) in enumerate(SITE_SCANNERS)]
    public = SiteSpec(name="public", n_volumes=args.public, labels={1: "pancreas", 2: "tumor"}, shape=(args.size,) * 3,
                      tumor=True, seed=args.seed * 1009 + 55, **PUBLIC_SCANNER)
    volumes = [make_phantom(public, i) for i in range(args.public)]
    return specs, volumes, (args.patients / n, 1 - (args.patients + args.test) / n, args.test / n)


def step_times(args) -> dict:
    """Seconds per local training step, plain and DP-SGD, same plan, batch 2 (q = 1 of 2 patients)."""
    import numpy as np
    import torch
    from monai.data import MetaTensor

    import voxgrid
    from voxgrid.datasets import default_sites, make_phantom
    from voxgrid.nodes.worker.training import Trainer, pick_device
    from voxgrid.plan import build_network

    size = args.timing_size
    site = default_sites(n_sites=2, shape=(size,) * 3, n_volumes=2, seed=args.seed)[1]
    data = []
    for i in range(2):
        v = make_phantom(site, i)
        image = np.clip((np.asarray(v.image, dtype=np.float32) + 200) / 500, 0, 1)
        data.append({"image": MetaTensor(torch.as_tensor(image)[None]),
                     "label": MetaTensor(torch.as_tensor(np.asarray(v.label, dtype=np.float32))[None]),
                     "patient": f"p{i}"})
    trainer = Trainer(pick_device(args.device))
    plans = {label: voxgrid.unet_plan(TIMING_LABELS, patch_size=(size,) * 3, channels=TIMING_NET["channels"],
                                      strides=TIMING_NET["strides"], num_res_units=TIMING_NET["res_units"],
                                      batch_size=2, samples_per_volume=1, local_epochs=1,
                                      steps_per_epoch=args.timing_steps, amp=False, privacy=privacy)
             for label, privacy in (("plain", None),
                                    ("dp_sgd", {"mechanism": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0,
                                                "delta": DELTA, "sample_rate": 1.0}))}
    torch.manual_seed(0)
    net = build_network(plans["plain"]).to(trainer.device)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    best = {label: math.inf for label in plans}
    cpu = {label: math.inf for label in plans}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # as a node's worker runs (--threads)
    try:
        # Interleaved and repeated, the minimum kept: other work on the machine only ever adds time.
        for rep in range(1 + TIMING_REPEATS):  # the first pass warms up (allocations, first-call dispatch)
            for label, plan in plans.items():
                net.load_state_dict(start)
                t, c = time.perf_counter(), time.process_time()
                trainer.train(plan, net, data, seed=0, present={1, 2})
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                if rep:
                    best[label] = min(best[label], (time.perf_counter() - t) / args.timing_steps)
                    cpu[label] = min(cpu[label], (time.process_time() - c) / args.timing_steps)
    finally:
        torch.set_num_threads(threads)
    out = dict(best)
    out["slowdown"] = out["dp_sgd"] / out["plain"]
    # CPU seconds (this process, all threads): steadier than wall time on a machine shared with other work
    out["cpu_s"] = cpu
    out["cpu_slowdown"] = cpu["dp_sgd"] / cpu["plain"]
    return out


def experiment_epsilons(exp) -> tuple[list[float], list[float]]:
    """Per site, the epsilon (RDP, PRV) of this experiment's releases, from the parameters in the nodes'
    receipts. Not the receipts' cumulative figure: that covers every release of the dataset to this
    scientist, and the no-DP run before makes it unbounded."""
    from voxgrid.privacy.accountant import GaussianEvent, epsilon

    per_site: dict[str, list[GaussianEvent]] = {}
    for r in exp.history:
        for s in r.sites:
            if s.privacy and s.privacy.get("dp") and s.privacy["mechanism"].startswith("dp_sgd"):
                p = s.privacy["parameters"][0]
                per_site.setdefault(s.site, []).append(GaussianEvent(p["noise_multiplier"], p["sample_rate"], p["steps"]))
    rdp = [epsilon(ev, DELTA) for ev in per_site.values()]
    prv = [epsilon(ev, DELTA, "prv") for ev in per_site.values()]
    return rdp, prv


def runs(args, plan) -> list[tuple[str, float | None, object]]:
    """(label, target epsilon, plan) for every fine-tuning run: non-private first, then DP, largest epsilon first."""
    out = [("non-private FL", None, plan)]
    head = head_prefix(plan)
    for e in sorted(args.epsilons, reverse=True):
        dp = make_plan(args, dp_sgd_spec(args, e))
        out.append((f"DP-FL eps={e:g} all", e, dp))
        if not args.no_head:
            out.append((f"DP-FL eps={e:g} head", e, dp.with_local(train_only=[head])))
    return out


def federate(args, specs, splits, initial, echo) -> tuple[list[dict], object]:
    """Fine-tune ``initial`` at the nodes in every run; returns the rows and the cross-site table."""
    import voxgrid
    from voxgrid.nodes.local.federation import LocalFederation
    from voxgrid.selection import SelectedModel

    keep = args.root is not None
    root = args.root or Path(tempfile.mkdtemp(prefix="voxgrid-privacy-utility-"))
    rows, models = [], []
    plan = make_plan(args)
    fed = LocalFederation.create(root, specs, threads=args.threads, device=args.device, splits=splits)
    try:
        with fed:
            fed.start()
            grid = fed.connect()
            try:
                pointers = sorted(grid.search("#ct", "#pancreas"), key=lambda p: p.name)
                echo(f"[privacy-utility] {len(pointers)} sites, train patients "
                     f"{[p.info.splits['train'] for p in pointers]}, test {[p.info.splits['test'] for p in pointers]}; "
                     f"{args.size}^3 volumes, {args.patch}^3 patches, {args.rounds} rounds, q={args.sample_rate:g}, "
                     f"K={args.multiplicity}, delta={DELTA:g}")
                models.append(SelectedModel(name="public only", weights=initial, plan=plan, experiment_id="public",
                                            round=0))
                rows.append({"run": "public only", "target_epsilon": None, "train_s": 0.0})
                for label, target, run_plan in runs(args, plan):
                    t = time.perf_counter()
                    exp = voxgrid.Experiment(run_plan, pointers, rounds=args.rounds, evaluate=False, seed=args.seed,
                                             initial=initial, name="pu-" + label.replace(" ", "-").replace("=", ""))
                    exp.run(progress=False)
                    eps, eps_prv = experiment_epsilons(exp)
                    noise = [s.privacy["parameters"][0]["noise_multiplier"] for s in exp.history[-1].sites
                             if s.privacy and s.privacy.get("dp")]
                    models.append(SelectedModel(name=label, weights=exp.global_weights, plan=exp.plan,
                                                experiment_id=exp.experiment_id, round=args.rounds - 1))
                    rows.append({"run": label, "target_epsilon": target, "noise_multiplier": max(noise, default=None),
                                 "epsilon_rdp": max(eps, default=None), "epsilon_prv": max(eps_prv, default=None),
                                 "train_s": time.perf_counter() - t})
                    echo(f"[privacy-utility] {label}: {rows[-1]['train_s']:.0f} s")
                table = voxgrid.cross_site_evaluation(models, pointers, seed=args.seed)
            finally:
                grid.close()
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return rows, table


def gap_closed(rows: list[dict]) -> None:
    """Each row's share of the gap between public only (0) and non-private FL (1), in place."""
    by = {r["run"]: r["mean_dice"] for r in rows}
    lo, hi = by.get("public only"), by.get("non-private FL")
    for r in rows:
        ok = None not in (lo, hi, r["mean_dice"]) and hi - lo > 0
        r["gap_closed"] = (r["mean_dice"] - lo) / (hi - lo) if ok else None


def run(args, echo=print) -> dict:
    import torch

    import voxgrid

    t0 = time.perf_counter()
    specs, public, splits = sites(args)
    plan = make_plan(args)
    t = time.perf_counter()
    initial = voxgrid.pretrain(plan, public, epochs=args.pretrain_epochs, seed=args.seed,
                               label_names={1: "pancreas", 2: "tumor"}, device=args.device)
    pretrain_s = time.perf_counter() - t
    echo(f"[privacy-utility] pretrained on {len(public)} public volumes (scanner {PUBLIC_SCANNER}), "
         f"{args.pretrain_epochs} epochs, {pretrain_s:.0f} s")
    rows, table = federate(args, specs, splits, initial, echo)
    for row in rows:
        avg = table.average(row["run"])
        row["mean_dice"], row["dice"] = avg.get("mean"), table.dice[row["run"]]
        row["errors"] = table.errors.get(row["run"], {})
    gap_closed(rows)
    echo(str(table))
    echo(render(rows))
    timing = step_times(args) if args.timing_steps else None
    if timing:
        echo(f"[privacy-utility] one local step, UNet {list(TIMING_NET['channels'])} at {args.timing_size}^3, batch 2, "
             f"{args.device}: plain {timing['plain']:.3f} s, DP-SGD {timing['dp_sgd']:.3f} s, "
             f"{timing['slowdown']:.2f} times (target <= {TARGET_SLOWDOWN:g}); CPU time {timing['cpu_slowdown']:.2f} times")
    total = time.perf_counter() - t0
    echo(f"[privacy-utility] total {total:.1f} s")
    ref = reference(rows)
    last = (f"share of the gap (public only -> non-private FL) that {ref['run'] if ref else 'DP-FL'} closes: "
            + ("-" if not ref or ref["gap_closed"] is None else f"{ref['gap_closed']:.2f}"))
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
              if k not in ("json", "root")}
    return {"benchmark": "privacy_utility", "config": {**config, "delta": DELTA, "public_scanner": PUBLIC_SCANNER},
            "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
            "rows": rows, "table": table.to_dict(), "pretrain_s": pretrain_s, "step_time_s": timing,
            "gap_closed": ref["gap_closed"] if ref else None, "last_line": last, "total_s": total}


def reference(rows: list[dict]) -> dict | None:
    """The DP run the last line reports: all parameters at the largest target epsilon."""
    dp = [r for r in rows if r["target_epsilon"] is not None and r["run"].endswith(" all")]
    return max(dp, key=lambda r: r["target_epsilon"]) if dp else None


def render(rows: list[dict]) -> str:
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    lines = [f"{'run':<22} {'noise':>7} {'eps (RDP)':>10} {'eps (PRV)':>10} {'mean Dice':>10} {'gap closed':>11}",
             "-" * 75]
    for r in rows:
        lines.append(f"{r['run']:<22} {fmt(r.get('noise_multiplier'), '.3f'):>7} {fmt(r.get('epsilon_rdp'), '.3f'):>10} "
                     f"{fmt(r.get('epsilon_prv'), '.3f'):>10} {fmt(r['mean_dice'], '.3f'):>10} "
                     f"{fmt(r['gap_closed'], '.2f'):>11}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = run(args)
    write_json(args.json, out, "privacy-utility")
    print(out["last_line"])  # the issue's figure, as the very last line
    return 0


if __name__ == "__main__":
    sys.exit(main())
