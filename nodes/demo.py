"""``voxgrid demo``: a real federation on loopback, one command, a few minutes on 2 CPU cores."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from voxgrid.datasets import default_sites

from .federation import LocalFederation


def run_demo(out: Path, *, sites: int = 3, rounds: int = 5, size: int = 32, volumes: int = 8,
             local_epochs: int = 3, fmt: str = "nifti", threads: int = 1, seed: int = 0, echo=print) -> dict:
    """Build and start a federation under ``out``, train with FedAvg, write ``out/results.json``."""
    import voxgrid

    out = Path(out).resolve()
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    specs = default_sites(n_sites=sites, shape=(size,) * 3, n_volumes=volumes, seed=seed)
    echo(f"[demo] writing CA, certificates and {sum(s.n_volumes for s in specs)} phantom volumes "
         f"({size}^3, {fmt}) for {sites} sites under {out}")
    fed = LocalFederation.create(out, specs, fmt=fmt, threads=threads)
    with fed:
        fed.start()
        echo(f"[demo] grid {fed.grid.url} and {len(fed.nodes)} data nodes up over TLS "
             f"({time.perf_counter() - t0:.1f} s)")
        grid = fed.connect()
        pointers = grid.search("#ct", "#pancreas")
        echo(repr(pointers))
        patch = min(size, 32)
        plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(patch,) * 3,
                                 local_epochs=local_epochs)
        exp = voxgrid.Experiment(plan, pointers, rounds=rounds, checkpoint_dir=out / "checkpoints", seed=seed,
                                 name="demo")
        exp.run(progress=False, on_round=lambda e, r: echo(
            e.dice_table() + f"\n  wall {r.wall_s:.2f} s: local compute {r.compute_s:.2f} s, "
            f"other {r.overhead_s:.2f} s, evaluation {r.eval_wall_s:.2f} s\n"))
        results = exp.results() | {"federation": fed.describe(), "total_s": time.perf_counter() - t0}
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

    def run(args):
        if args.sites < 1 or args.rounds < 1 or args.size < 16 or args.volumes < 3:
            raise ValueError("need --sites >= 1, --rounds >= 1, --size >= 16 and --volumes >= 3")
        run_demo(args.out, sites=args.sites, rounds=args.rounds, size=args.size, volumes=args.volumes,
                 local_epochs=args.local_epochs, fmt=args.fmt, threads=args.threads, seed=args.seed)

    p.set_defaults(func=run)
