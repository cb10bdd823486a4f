"""DP-SGD's step against a plain step, both ways of getting per-patient gradients (issue 14).

For each UNet (``--channels``, several allowed) at ``--patch``^3: a plain step (forward and backward of
``--patients`` x ``--views`` patches as one batch, Adam), a DP-SGD step with one backward pass per patient,
and a DP-SGD step with the patients vmapped together (``nodes/worker/dp.py``), each clipping, adding noise
and stepping Adam. CPU time (``time.process_time``), the minimum over ``--repeats`` interleaved repeats,
``--threads`` torch threads (1: a node's worker on a small machine)::

    .venv/bin/python benchmarks/dp_step.py [--channels 8,16,32 16,32,64,128] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import write_json  # noqa: E402

LABELS = ["background", "pancreas", "tumor"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", nargs="+", default=["8,16,32", "16,32,64,128", "16,32,64,128,256"],
                   help="UNet channels, one comma-separated list per network")
    p.add_argument("--res-units", type=int, nargs="+", default=[1, 1, 2], help="residual units, one per network")
    p.add_argument("--patch", type=int, default=32, help="patch edge in voxels")
    p.add_argument("--patients", type=int, default=2)
    p.add_argument("--views", type=int, default=1, help="augmented patches per patient (K)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, metavar="OUT")
    args = p.parse_args(argv)
    if len(args.res_units) not in (1, len(args.channels)):
        p.error("--res-units: one value, or one per --channels")
    return args


def steps(channels: tuple[int, ...], res_units: int, args) -> dict:
    """The three step functions for one network, sharing its weights, data and optimiser."""
    import torch

    import voxgrid
    from voxgrid.nodes.worker.dp import VmappedGradients, clipped_grad_sum, patient_chunk
    from voxgrid.nodes.worker.objective import LocalObjective
    from voxgrid.plan import build_network

    plan = voxgrid.unet_plan(LABELS, patch_size=(args.patch,) * 3, channels=channels,
                             strides=(2,) * (len(channels) - 1), num_res_units=res_units,
                             batch_size=args.patients, norm="group", norm_groups=1)
    torch.manual_seed(0)
    net = build_network(plan)
    objective = LocalObjective(plan, {1, 2}, net)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, 1e-3)
    n, k = args.patients, args.views
    x = torch.randn(n * k, 1, *(args.patch,) * 3)
    y = torch.randint(0, len(LABELS), (n * k, 1, *(args.patch,) * 3), dtype=torch.uint8)
    patients = [(x[i * k:(i + 1) * k], y[i * k:(i + 1) * k]) for i in range(n)]
    chunk = patient_chunk(k, sum(p.numel() for p in params))
    vmapped = VmappedGradients(net, objective.vmap_loss(), params)

    def plain():
        opt.zero_grad(set_to_none=True)
        objective.data_loss(net(x), y).backward()
        opt.step()

    def dp(batched):
        total, _ = clipped_grad_sum(net, objective.data_loss, params, patients, lambda v: v, 1.0,
                                    batched=batched, chunk=chunk)
        for p, g in zip(params, total, strict=True):
            p.grad = (g + torch.randn_like(g)) / n
        opt.step()

    return {"plain": plain, "dp_loop": lambda: dp(None), "dp_vmap": lambda: dp(vmapped)}


def measure(fns: dict, repeats: int) -> dict:
    """Minimum CPU seconds per call of each function, the functions interleaved within each repeat."""
    for f in fns.values():
        f()  # warm: allocator, oneDNN primitives
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.process_time()
            f()
            best[name] = min(best[name], time.process_time() - t)
    return best


def main(argv=None, echo=print) -> list[dict]:
    import torch

    args = parse(argv)
    torch.set_num_threads(args.threads)
    units = args.res_units * len(args.channels) if len(args.res_units) == 1 else args.res_units
    rows = []
    echo(f"[dp-step] {args.patients} patients x {args.views} views of {args.patch}^3, {args.threads} thread(s), "
         f"CPU time, min of {args.repeats}")
    for spec, res in zip(args.channels, units, strict=True):
        channels = tuple(int(c) for c in spec.split(","))
        best = measure(steps(channels, res, args), args.repeats)
        row = {"channels": list(channels), "res_units": res, **{f"{k}_s": v for k, v in best.items()},
               "loop_ratio": best["dp_loop"] / best["plain"], "vmap_ratio": best["dp_vmap"] / best["plain"]}
        rows.append(row)
        echo(f"[dp-step] UNet {channels}, {res} residual unit(s): plain {best['plain'] * 1e3:.0f} ms, "
             f"DP-SGD a pass per patient {best['dp_loop'] * 1e3:.0f} ms ({row['loop_ratio']:.2f}x), "
             f"vmapped {best['dp_vmap'] * 1e3:.0f} ms ({row['vmap_ratio']:.2f}x)")
    write_json(args.json, {"rows": rows}, "dp-step")
    echo(f"largest DP-SGD step / plain step, vmapped: {max(r['vmap_ratio'] for r in rows):.2f} (target <= 2)")
    return rows


if __name__ == "__main__":
    main()
