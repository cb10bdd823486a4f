"""The cost of patient-level DP-SGD in accuracy and in time, on the phantom federation.

Starts a real federation on loopback (:class:`voxgrid.nodes.local.federation.LocalFederation`: CA, grid
and one node process per phantom site, ``voxgrid.datasets.default_sites``) and trains the same
plan with FedAvg, the same rounds and steps, once without DP and once per target epsilon with
DP-SGD at the nodes (``plan.privacy = {"mechanism": "dp_sgd", ...}``). For a target epsilon the
noise multiplier comes from Opacus's ``get_noise_multiplier`` (RDP, the accountant the nodes'
budgets use) for all the experiment's steps at the sample rate ``batch_size / fewest train
patients of any site``, stated in the spec so every site runs at the same rate and spends the same
epsilon. The table gives each run's final global model's mean Dice over the sites' test splits
and the epsilon the nodes' receipts state (RDP, and the tighter PRV figure).

It also times one local training step with and without DP-SGD on the skeleton's benchmark UNet
((16, 32, 64, 128, 256), 2 residual units) at 32^3, batch 2 (the issue's speed target: DP-SGD at
most 2 times the plain step), in-process with the node's own Trainer.

    python benchmarks/privacy_utility.py                          # moderate size
    python benchmarks/privacy_utility.py --small --json out.json  # CI size (< 60 s)
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

LABELS = ["background", "pancreas", "tumor"]
DELTA = 1e-5
TARGET_SLOWDOWN = 2.0
TIMING_REPEATS = 3

FULL = dict(size=32, rounds=10, volumes=8, local_epochs=1, steps=8, channels=(16, 32, 64), strides=(2, 2),
            res_units=1, timing_steps=10)
SMALL = dict(size=16, rounds=1, volumes=4, local_epochs=1, steps=2, channels=(4, 8), strides=(2,),
             res_units=0, timing_steps=2)
#: the skeleton's benchmark UNet (benchmarks/round_overhead.py), for the step timing
TIMING_NET = dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), res_units=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CI size: 16^3, 1 round, 4 volumes, tiny UNet")
    p.add_argument("--size", type=int, help="volume and patch edge in voxels (default 32; --small: 16)")
    p.add_argument("--rounds", type=int, help="rounds per run (default 10; --small: 1)")
    p.add_argument("--volumes", type=int, help="volumes at sites a and b (site c gets half, at least 3)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (default 1)")
    p.add_argument("--steps", type=int, help="optimiser steps per local epoch, DP or not (default 8; --small: 2)")
    p.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 4.0, 8.0],
                   help="target epsilons, each a run with DP-SGD (default: 1 4 8); a run without DP is always added")
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
    for key in ("size", "rounds", "volumes", "local_epochs", "steps", "timing_steps"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.channels, args.strides, args.res_units = base["channels"], base["strides"], base["res_units"]
    if args.size < 16 or args.rounds < 1 or args.volumes < 4 or args.local_epochs < 1 or args.steps < 1:
        p.error("need --size >= 16, --rounds >= 1, --volumes >= 4, --local-epochs >= 1 and --steps >= 1")
    if any(not (e > 0 and math.isfinite(e)) for e in args.epsilons):
        p.error(f"--epsilons must be positive numbers, got {args.epsilons}")
    if args.timing_steps < 0 or args.max_grad_norm <= 0:
        p.error("need --timing-steps >= 0 and --max-grad-norm > 0")
    if args.timing_size < 32 or args.timing_size % 16:
        p.error(f"--timing-size must be a multiple of 16, at least 32 (the timed UNet halves it 4 times), "
                f"got {args.timing_size}")
    return args


def make_plan(args, privacy=None):
    import voxgrid

    # Instance norm (MONAI UNet's default): DP-SGD refuses batch norm. One patch per volume, so a
    # non-DP step sees what a DP step sees: batch_size patches, one per patient.
    return voxgrid.unet_plan(LABELS, patch_size=(args.size,) * 3, channels=args.channels, strides=args.strides,
                             num_res_units=args.res_units, lr=2e-3, batch_size=2, samples_per_volume=1,
                             local_epochs=args.local_epochs, steps_per_epoch=args.steps, amp=False,
                             name="privacy-utility", privacy=privacy)


def dp_sgd_spec(target: float, q: float, steps: int, max_grad_norm: float) -> dict:
    """The dp_sgd filter whose RDP epsilon after ``steps`` steps at rate ``q`` is at most ``target``."""
    from opacus.accountants.utils import get_noise_multiplier

    z = get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp")
    return {"mechanism": "dp_sgd", "noise_multiplier": float(z), "max_grad_norm": max_grad_norm, "delta": DELTA,
            "sample_rate": q}


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
    plans = {label: voxgrid.unet_plan(LABELS, patch_size=(size,) * 3, channels=TIMING_NET["channels"],
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
    # Interleaved and repeated, the minimum kept: other work on the machine only ever adds time.
    for _ in range(1 + TIMING_REPEATS):  # the first pass warms up (allocations, first-call dispatch)
        for label, plan in plans.items():
            net.load_state_dict(start)
            t = time.perf_counter()
            trainer.train(plan, net, data, seed=0, present={1, 2})
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            best[label] = min(best[label], (time.perf_counter() - t) / args.timing_steps) if _ else best[label]
    out = dict(best)
    out["slowdown"] = out["dp_sgd"] / out["plain"]
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


def run(args, echo=print) -> dict:
    import torch

    import voxgrid
    from voxgrid.datasets import default_sites
    from voxgrid.nodes.local.federation import LocalFederation
    from voxgrid.selection import SelectedModel

    t0 = time.perf_counter()
    specs = default_sites(n_sites=3, shape=(args.size,) * 3, n_volumes=args.volumes, seed=args.seed)
    keep = args.root is not None
    root = args.root or Path(tempfile.mkdtemp(prefix="voxgrid-privacy-utility-"))
    steps = args.rounds * args.local_epochs * args.steps
    rows = []
    fed = LocalFederation.create(root, specs, threads=args.threads, device=args.device)
    try:
        with fed:
            fed.start()
            grid = fed.connect()
            try:
                pointers = sorted(grid.search("#ct", "#pancreas"), key=lambda p: p.name)
                fewest = min(p.info.splits["train"] for p in pointers)
                q = min(1.0, 2 / fewest)  # the plan's batch 2 over the smallest site's patients
                echo(f"[privacy-utility] {len(pointers)} sites, train patients "
                     f"{[p.info.splits['train'] for p in pointers]}; {args.size}^3, {args.rounds} rounds x "
                     f"{args.local_epochs} epochs x {args.steps} steps = {steps} steps, q={q:.3g}, delta={DELTA:g}")
                runs = [("no DP", None, None)] + [(f"DP-SGD eps={e:g}", e, dp_sgd_spec(e, q, steps, args.max_grad_norm))
                                                  for e in sorted(args.epsilons, reverse=True)]
                models = []
                for label, target, privacy in runs:
                    t = time.perf_counter()
                    plan = make_plan(args, privacy)
                    exp = voxgrid.Experiment(plan, pointers, rounds=args.rounds, evaluate=False, seed=args.seed,
                                             name="pu-" + ("nodp" if target is None else f"eps{target:g}"))
                    exp.run(progress=False)
                    eps, eps_prv = experiment_epsilons(exp)
                    models.append(SelectedModel(name=label, weights=exp.global_weights, plan=exp.plan,
                                                experiment_id=exp.experiment_id, round=args.rounds - 1))
                    rows.append({"run": label, "target_epsilon": target,
                                 "noise_multiplier": privacy["noise_multiplier"] if privacy else None,
                                 "sample_rate": q if privacy else None, "steps": steps, "delta": DELTA if privacy else None,
                                 "epsilon_rdp": max(eps) if eps else None,
                                 "epsilon_prv": max(eps_prv) if eps_prv else None,
                                 "train_s": time.perf_counter() - t})
                table = voxgrid.cross_site_evaluation(models, pointers, seed=args.seed)
            finally:
                grid.close()
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    for row in rows:
        row["mean_dice"] = table.average(row["run"]).get("mean")
        row["errors"] = table.errors.get(row["run"], {})
    echo(render(rows))
    timing = step_times(args) if args.timing_steps else None
    if timing:
        echo(f"[privacy-utility] one local step, UNet {list(TIMING_NET['channels'])} at {args.timing_size}^3, batch 2, "
             f"{args.device}: plain {timing['plain']:.3f} s, DP-SGD {timing['dp_sgd']:.3f} s, "
             f"{timing['slowdown']:.2f} times (target <= {TARGET_SLOWDOWN:g})")
    total = time.perf_counter() - t0
    echo(f"[privacy-utility] total {total:.1f} s")
    return {
        "benchmark": "privacy_utility",
        "config": {"size": args.size, "rounds": args.rounds, "volumes": args.volumes, "local_epochs": args.local_epochs,
                   "steps_per_epoch": args.steps, "epsilons": list(args.epsilons), "delta": DELTA,
                   "max_grad_norm": args.max_grad_norm, "channels": list(args.channels), "small": args.small,
                   "device": args.device, "threads": args.threads, "seed": args.seed},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "rows": rows, "step_time_s": timing, "total_s": total,
    }


def render(rows: list[dict]) -> str:
    fmt = lambda x, f: "-" if x is None else format(x, f)
    lines = [f"{'run':<18} {'noise':>7} {'eps (RDP)':>10} {'eps (PRV)':>10} {'mean Dice':>10}",
             "-" * 59]
    for r in rows:
        lines.append(f"{r['run']:<18} {fmt(r['noise_multiplier'], '.3f'):>7} {fmt(r['epsilon_rdp'], '.3f'):>10} "
                     f"{fmt(r['epsilon_prv'], '.3f'):>10} {fmt(r['mean_dice'], '.3f'):>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = run(args)
    write_json(args.json, out, "privacy-utility")
    return 0


if __name__ == "__main__":
    sys.exit(main())
