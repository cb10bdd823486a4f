"""``voxgrid demo``: a real federation on loopback, one command, a few minutes on 2 CPU cores."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from voxgrid.datasets import default_sites

from voxgrid.nodes.ops.admin import privacy_report
from voxgrid.nodes.local.federation import LocalFederation
from voxgrid.nodes.local.review import approve_by_review
from voxgrid.nodes.local.dp_recipe import dp_plan, public_weights, recipe_plan, three_rows

#: The demo's DP-SGD: patient-level, a target epsilon for the whole experiment and per-patient gradient clip (L2).
DEMO_DP_EPSILON = 8.0
DEMO_DP_CLIP = 1.0


def run_demo(out: Path, *, sites: int = 3, rounds: int = 5, size: int = 32, volumes: int = 8,
             local_epochs: int = 3, fmt: str = "nifti", threads: int = 1, seed: int = 0, secure: bool = True,
             dp: bool = True, dp_epsilon: float = DEMO_DP_EPSILON, dp_noise: float | None = None,
             review: bool = False, echo=print) -> dict:
    """Build and start a federation under ``out``, train with FedAvg, write ``out/results.json``.

    ``secure``: aggregate with secure aggregation (the notebook sees only the sum; needs >= 2 sites).
    Both experiments start from weights pretrained here on public phantoms (:mod:`.dp_recipe`).
    ``dp``: first fine-tune with patient-level DP-SGD at every node, at ``dp_epsilon`` for the whole
    experiment (the nodes derive the noise; ``dp_noise``: a noise multiplier instead), then print the
    three rows (public only, DP, no DP), the privacy receipts, and write each node's privacy report to
    ``out/privacy-report/<node>/``.
    ``review``: every dataset under review; each experiment asks the owners first (:mod:`.review`).
    """
    import voxgrid

    out = Path(out).resolve()
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    specs = default_sites(n_sites=sites, shape=(size,) * 3, n_volumes=volumes, seed=seed)
    echo(f"[demo] writing CA, certificates and {sum(s.n_volumes for s in specs)} phantom volumes "
         f"({size}^3, {fmt}) for {sites} sites under {out}")
    fed = LocalFederation.create(out, specs, fmt=fmt, threads=threads, policy="review" if review else "open")
    with fed:
        fed.start()
        echo(f"[demo] grid {fed.grid.url} and {len(fed.nodes)} data nodes up over TLS "
             f"({time.perf_counter() - t0:.1f} s)")
        grid = fed.connect()
        pointers = grid.search("#ct", "#pancreas")
        echo(repr(pointers))
        plan = recipe_plan(["background", "pancreas", "tumor"], size, local_epochs)
        initial = public_weights(plan, size, seed, echo=echo)
        secure = secure and len(pointers) >= 2

        def train(plan, name: str, what: str):
            exp = voxgrid.Experiment(plan, pointers, rounds=rounds, checkpoint_dir=out / "checkpoints" / name,
                                     seed=seed, name=name, secure_aggregation=secure, initial=initial)
            if review:
                approve_by_review(exp, fed, echo)
            echo(f"[demo] {what}: FedAvg over {len(pointers)} sites, "
                 + (f"secure aggregation (threshold {exp.threshold}): this notebook sees only the sum of the "
                    "updates" if secure else "plain aggregation"))
            exp.run(progress=False, on_round=lambda e, r: echo(
                e.dice_table() + f"\n  wall {r.wall_s:.2f} s: local compute {r.compute_s:.2f} s, "
                f"other {r.overhead_s:.2f} s, evaluation {r.eval_wall_s:.2f} s\n"))
            return exp

        dp_exp, summary = None, None
        if dp:  # first: the ledger's cumulative bound holds only while every release is DP
            private = dp_plan(plan, rounds, dp_epsilon, dp_noise, DEMO_DP_CLIP)
            what = f"noise multiplier {dp_noise}" if dp_noise else f"target epsilon {dp_epsilon:g} over {rounds} rounds"
            dp_exp = train(private, "demo-dp", f"patient-level DP-SGD fine-tuning ({what}, clip {DEMO_DP_CLIP}, "
                           "4 views per patient, Poisson rate 0.5)")
            summary = dp_exp.privacy_summary()
            echo("[demo] privacy receipts of the DP-SGD experiment (epsilon at delta 1e-5; unit: the patient):")
            echo(summary.drop(columns=["note"]).to_string(index=False))
            if len(summary):
                echo(f"[demo] {summary['note'].iloc[0]}")
        exp = train(plan, "demo", "the same plan without DP")
        results = exp.results()
        if not review:  # under review, scoring the public-only model would need another approval
            echo(f"[demo] after {rounds} rounds, from the same public pretraining:")
            echo(str(three_rows(plan, initial, dp_exp, exp, pointers, seed)))
        if dp_exp is not None:
            echo(f"[demo] mean test Dice of the global model after {rounds} rounds: without DP "
                 f"{exp.history[-1].mean_test_dice:.3f}, with DP-SGD {dp_exp.history[-1].mean_test_dice:.3f} at "
                 f"epsilon up to {summary['cumulative_epsilon'].max():.1f} per site. A handful of patients per site "
                 "is far from what DP-SGD needs: see benchmarks/privacy_utility.py for 100 patients a site.")
            results = results | {"dp_experiment": dp_exp.results()}
        for p in fed.nodes:
            _, page = privacy_report(p.home, out / "privacy-report" / p.name)
            echo(f"[demo] privacy report of {p.name} (its owner's view): {page}")
        results = results | {"federation": fed.describe(), "total_s": time.perf_counter() - t0}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        grid.close()
    echo(f"[demo] results in {out / 'results.json'}; everything stopped ({time.perf_counter() - t0:.1f} s)")
    return results


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a whole federation on this machine: CA, grid, 3 nodes, FedAvg")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for everything the demo makes")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=32, help="volume edge in voxels")
    p.add_argument("--volumes", type=int, default=8, help="volumes per site (the small site gets fewer)")
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--format", choices=["nifti", "dicom"], default="nifti", dest="fmt")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-secure-aggregation", action="store_false", dest="secure",
                   help="let the notebook see each site's update (secure aggregation is on by default)")
    p.add_argument("--dp-epsilon", type=float, default=DEMO_DP_EPSILON,
                   help=f"target epsilon of the DP-SGD experiment, all rounds (default {DEMO_DP_EPSILON:g})")
    p.add_argument("--dp-noise", type=float, default=None,
                   help="a noise multiplier for the DP-SGD experiment instead of the target epsilon")
    p.add_argument("--no-dp", action="store_false", dest="dp", help="skip the DP-SGD experiment")
    p.add_argument("--review", action="store_true",
                   help="datasets under review: each experiment asks every owner, one denies first, then they approve")

    def run(args):
        if args.sites < 1 or args.rounds < 1 or args.size < 16 or args.volumes < 3:
            raise ValueError("need --sites >= 1, --rounds >= 1, --size >= 16 and --volumes >= 3")
        if args.dp_noise is not None and not args.dp_noise > 0:
            raise ValueError(f"--dp-noise must be a positive noise multiplier, got {args.dp_noise}")
        if not 0 < args.dp_epsilon <= 100:
            raise ValueError(f"--dp-epsilon must be in (0, 100], got {args.dp_epsilon}")
        run_demo(args.out, sites=args.sites, rounds=args.rounds, size=args.size, volumes=args.volumes,
                 local_epochs=args.local_epochs, fmt=args.fmt, threads=args.threads, seed=args.seed,
                 secure=args.secure, dp=args.dp, dp_epsilon=args.dp_epsilon, dp_noise=args.dp_noise,
                 review=args.review)

    p.set_defaults(func=run)
