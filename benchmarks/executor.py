"""The executor's data path and training step on whatever device is present (issue 17, item 3).

Figures, in order:

1. patch draw: 4 patches of ``--patch``^3 from one ``--shape`` volume with MONAI's
   ``RandCropByPosNegLabeld`` as the trainer called it before (it rescans the label map for its
   foreground/background voxels every call) and as it does now (indices computed once, when the volume
   is prepared, and cached with it); the one-off index pass too;
2. an epoch's patch preparation at ``--train-shape`` (``--volumes`` volumes, ``--samples`` patches each),
   cropped up front as before against the lazy loader's cropping;
3. plain training steps per second end to end (Trainer.train: loader, forward, backward, step), the time
   the step waited for data, and, on CUDA, the GPU's busy fraction (CUDA events around each step's
   compute against wall time) for float32 and bfloat16 autocast, and peak memory;
4. DP-SGD's time per step (one backward pass per sampled patient) against the plain step;
5. evaluation peak memory: one ``Trainer.evaluate`` (sliding-window inference of a tiny UNet, Dice on
   uint8 label maps) on one ``--eval-shape`` volume (default 512 x 512 x 300) for each of ``--eval-classes``
   (default 3 and 14): on CUDA ``max_memory_allocated`` above what was allocated before the call, on the
   CPU the peak RSS above the RSS before the call, each measurement in a fresh process. Against it the
   scoring before issue 17's fix (prediction and label one-hot encoded as int64 at full volume, 8 bytes a
   voxel a class each, into DiceMetric): measured where it fits (up to 3 classes), else computed, not run.
   ``--skip-eval`` skips it, ``--only-eval`` runs only it.

The last line gives the data path's share of a training step on this machine. Defaults are small on the
CPU (a 32^3 patch UNet on 64^3 volumes, the patch draw at the issue's 256 x 256 x 160 and 96^3) and the
issue's workload on CUDA (96^3 patches, 256 x 256 x 160 volumes, batch 2)::

    .venv/bin/python benchmarks/executor.py [--device cuda] [--json out.json]
    .venv/bin/python benchmarks/executor.py --only-eval [--eval-shape 512 512 300] [--eval-classes 3 14]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import write_json  # noqa: E402

LABELS = ["background", "pancreas", "tumor"]
#: The one-hot scoring of before is run up to this many classes; above, its bytes are computed (14 classes on
#: 512 x 512 x 300 would need ~18 GB more for its two int64 one-hot volumes alone).
EVAL_OLD_MAX_CLASSES = 3


def volume(shape, seed: int = 0) -> dict:
    """A prepared CT-like volume: image (1, *shape) float32, label (1, *shape) with an organ and a lesion."""
    import torch
    from monai.data import MetaTensor

    g = torch.Generator().manual_seed(seed)
    image = torch.randn((1, *shape), generator=g)
    label = torch.zeros((1, *shape), dtype=torch.float32)
    lo = [s // 3 for s in shape]
    hi = [s // 3 + max(2, s // 6) for s in shape]
    label[0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    label[0, lo[0]:lo[0] + 2, lo[1]:lo[1] + 2, lo[2]:lo[2] + 2] = 2
    image[label > 0] += 2.0
    return {"image": MetaTensor(image), "label": MetaTensor(label)}


def old_crop(patch, num_samples: int, seed: int):
    """The trainer's crop before issue 17: pad, then RandCropByPosNegLabeld scanning the label each call."""
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    keys = ["image", "label"]
    c = Compose([SpatialPadd(keys=keys, spatial_size=patch),
                 RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=1, neg=1,
                                        num_samples=num_samples, allow_smaller=False)])
    c.set_random_state(seed)
    return c


def bench_draw(args, echo) -> dict:
    from voxgrid.nodes.worker.patches import finish_prepared, patch_crop

    patch = (args.patch,) * 3
    item = volume(args.shape)
    before = old_crop(patch, 4, 0)
    t = [_timed(lambda: before(item)) for _ in range(args.repeats)]
    t0 = time.perf_counter()
    prepared = finish_prepared(item, train=True)
    once = time.perf_counter() - t0
    after = patch_crop(patch, (1, 1), 4, [], 0)
    after(prepared)  # warm
    a = [_timed(lambda: after(prepared)) for _ in range(args.repeats * 3)]
    one_before, one_after = old_crop(patch, 1, 0), patch_crop(patch, (1, 1), 1, [], 0)  # DP-SGD: one a patient
    d_b = [_timed(lambda: one_before(item)) for _ in range(args.repeats)]
    d_a = [_timed(lambda: one_after(prepared)) for _ in range(args.repeats * 3)]
    out = {"shape": list(args.shape), "patch": args.patch, "before_s": statistics.median(t),
           "after_s": statistics.median(a), "indices_once_s": once,
           "dp_patient_before_s": statistics.median(d_b), "dp_patient_after_s": statistics.median(d_a)}
    echo(f"[executor] 4 patches of {args.patch}^3 from {'x'.join(map(str, args.shape))}: before "
         f"{out['before_s'] * 1e3:.0f} ms, with cached indices {out['after_s'] * 1e3:.1f} ms "
         f"(indices computed once: {once * 1e3:.0f} ms); one DP-SGD patient's patch: before "
         f"{out['dp_patient_before_s'] * 1e3:.0f} ms, now {out['dp_patient_after_s'] * 1e3:.1f} ms")
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_epoch_prep(args, data, echo) -> dict:
    import random

    from voxgrid.nodes.worker.patches import PatchLoader, patch_crop

    patch = (args.train_patch,) * 3
    raw = [{k: d[k] for k in ("image", "label")} for d in data]
    crop = old_crop(patch, args.samples, 0)
    t0 = time.perf_counter()
    samples = [s for item in raw for s in crop(item)]
    random.Random(0).shuffle(samples)
    before = time.perf_counter() - t0
    loader = PatchLoader(data, patch_crop(patch, (1, 1), args.samples, [], 0), batch_size=args.batch,
                         samples_per_volume=args.samples, seed=0, device="cpu", on_device=False)
    t0 = time.perf_counter()
    n = sum(1 for _ in loader.epoch(loader.batches_per_pass(args.samples)))
    after = time.perf_counter() - t0
    echo(f"[executor] an epoch's patches ({len(data)} volumes x {args.samples} of {args.train_patch}^3 from "
         f"{'x'.join(map(str, args.train_shape))}, {n} batches): before {before:.3f} s, now {after:.3f} s")
    return {"before_s": before, "after_s": after, "batches": n}


def make_plan(args, amp: bool = False, dp: bool = False):
    import voxgrid

    plan = voxgrid.unet_plan(LABELS, patch_size=(args.train_patch,) * 3, channels=args.channels,
                             strides=(2,) * (len(args.channels) - 1), num_res_units=1,
                             batch_size=args.batch,
                             samples_per_volume=args.samples, local_epochs=1, steps_per_epoch=args.steps, amp=amp)
    if dp:
        plan = plan.model_copy(update={"privacy": {"mechanism": "dp_sgd", "noise_multiplier": 1.0,
                                                   "max_grad_norm": 1.0, "delta": 1e-5}})
    return plan


class GpuBusy:
    """CUDA events around each step's compute (forward pre-hook to optimiser step): busy seconds."""

    def __init__(self, net):
        import torch

        self.pairs, self._start = [], None
        self._h = [net.register_forward_pre_hook(self._begin),
                   torch.optim.optimizer.register_optimizer_step_post_hook(self._end)]

    def _begin(self, *_):
        import torch

        if self._start is None:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def _end(self, *_):
        import torch

        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pairs.append((self._start, end))
        self._start = None

    def seconds(self) -> float:
        import torch

        for h in self._h:
            h.remove()
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.pairs if s is not None) / 1e3


def bench_train(args, data, device, echo, amp: bool = False, dp: bool = False) -> dict:
    import torch

    from voxgrid.nodes.worker.training import Trainer
    from voxgrid.plan import initial_weights

    plan = make_plan(args, amp=amp, dp=dp)
    trainer = Trainer(device)
    net = trainer.network(plan, initial_weights(plan))
    present = {1, 2}
    trainer.train(plan, net, data, seed=0, present=present)  # warm: kernels, allocator, cudnn autotune
    busy = GpuBusy(net) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    _, steps = trainer.train(plan, net, data, seed=1, present=present)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    out = {"steps": steps, "wall_s": wall, "step_s": wall / max(steps, 1), "steps_per_s": steps / wall}
    if not dp:
        out |= {"wait_s": trainer.data_path["wait_s"], "crop_s": trainer.data_path["crop_s"],
                "on_device": trainer.data_path["on_device"]}
    if busy is not None:
        out["gpu_busy"] = busy.seconds() / wall
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    what = "DP-SGD" if dp else ("bfloat16" if amp else "float32")
    extra = f", GPU busy {out['gpu_busy']:.0%}, peak {out['peak_mib']:.0f} MiB" if busy is not None else ""
    waited = f", waited for data {out['wait_s'] / wall:.1%} of it" if not dp else ""
    echo(f"[executor] {what}: {steps} steps in {wall:.2f} s = {out['steps_per_s']:.2f} steps/s "
         f"({out['step_s'] * 1e3:.0f} ms a step){waited}{extra}")
    return out


# --- 5. evaluation peak memory ------------------------------------------------------------------------------

def eval_plan(n_classes: int):
    """A tiny UNet plan (its compute is cheap; the memory in question is the full-volume tensors around it)."""
    import voxgrid

    labels = ["background"] + [f"class{c}" for c in range(1, n_classes)]
    return voxgrid.unet_plan(labels, patch_size=(96, 96, 96), channels=(4, 8), strides=(2,), num_res_units=0)


def one_hot_scoring(plan, net, data, device):
    """The evaluation as it was before: full-volume one-hot int64 prediction and label into DiceMetric."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric

    net.eval()
    n_cls = len(plan.labels)
    metric = DiceMetric(include_background=False, reduction="mean_batch")
    with torch.no_grad():
        for item in data:
            x = item["image"].as_tensor()[None].to(device)
            logits = sliding_window_inference(x, roi_size=plan.patch_size, sw_batch_size=plan.sw_batch_size,
                                              predictor=net, overlap=plan.sw_overlap, padding_mode="constant")
            pred = torch.nn.functional.one_hot(logits.float().argmax(1), n_cls).permute(0, 4, 1, 2, 3)
            gt = torch.nn.functional.one_hot(item["label"].as_tensor()[0].long().to(device), n_cls)
            metric(y_pred=pred, y=gt.permute(3, 0, 1, 2)[None])
    return metric.aggregate()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux; harmless where refused)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def eval_peak(n_classes: int, shape, device, old: bool = False) -> dict:
    """One evaluation of one ``shape`` volume in this process: its peak memory above that before the call."""
    import torch

    from voxgrid.nodes.worker.patches import finish_prepared
    from voxgrid.nodes.worker.training import Trainer
    from voxgrid.plan import initial_weights

    plan = eval_plan(n_classes)
    trainer = Trainer(device)
    net = trainer.network(plan, initial_weights(plan))
    data = [finish_prepared(volume(shape), train=False)]
    present = set(range(1, n_classes))
    with torch.no_grad():  # one window first: the backend's one-off buffers are not the evaluation's
        net.eval()(torch.zeros((1, 1, *plan.patch_size), device=device))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    t0 = time.perf_counter()
    if old:
        one_hot_scoring(plan, net, data, device)
    else:
        trainer.evaluate(plan, net, data, present)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": peak, "seconds": time.perf_counter() - t0, "base_bytes": base}


def _eval_in_child(args, n_classes: int, old: bool) -> dict:
    """eval_peak in a fresh interpreter, so nothing allocated before (here or by earlier figures) counts."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu", "--threads", str(args.threads),
           "--eval-shape", *map(str, args.eval_shape), "--eval-child", str(n_classes)] + (["--eval-old"] * old)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"evaluation memory child ({n_classes} classes, old={old}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _available_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def bench_eval_memory(args, device, echo) -> dict:
    """Evaluation peak memory now, and with the one-hot int64 scoring of before, per class count."""
    import gc

    import torch

    voxels = args.eval_shape[0] * args.eval_shape[1] * args.eval_shape[2]
    dims = "x".join(map(str, args.eval_shape))
    cuda = device.type == "cuda"
    measure = (lambda n, old: eval_peak(n, args.eval_shape, device, old)) if cuda else \
        (lambda n, old: _eval_in_child(args, n, old))
    out = {"shape": list(args.eval_shape), "device": str(device),
           "what": ("max_memory_allocated above memory_allocated before the call" if cuda
                    else "peak RSS (ru_maxrss) above the RSS before the call, in a fresh process"),
           "classes": {}}
    for n in args.eval_classes:
        onehot = 2 * voxels * n * 8  # prediction and label, int64, n channels each
        fig = {"now": measure(n, False), "onehot_bytes": onehot, "before": None}
        # before: the one-hot volumes, the logits, int64 argmax and label; run only where that fits easily
        need = onehot + voxels * (4 * n + 16)
        if n <= EVAL_OLD_MAX_CLASSES and need < 0.6 * _available_bytes(device):
            fig["before"] = measure(n, True)
            before = f"{_size(fig['before']['peak_bytes'])} (measured; its two one-hot volumes {_size(onehot)})"
        else:
            before = f"+{_size(onehot)} for its two int64 one-hot volumes (computed, not run)"
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
        out["classes"][str(n)] = fig
        echo(f"[executor] evaluation peak memory, {n} classes, {dims}: {_size(fig['now']['peak_bytes'])} now "
             f"(measured, evaluate took {fig['now']['seconds']:.1f} s), one-hot int64 scoring before: {before}")
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present, else cpu)")
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160], help="volume for the patch draw")
    p.add_argument("--patch", type=int, default=96, help="patch edge for the patch draw")
    p.add_argument("--train-shape", type=int, nargs=3, default=None, help="training volumes (CPU 64^3, CUDA 256x256x160)")
    p.add_argument("--train-patch", type=int, default=None, help="training patch edge (CPU 32, CUDA 96)")
    p.add_argument("--volumes", type=int, default=4)
    p.add_argument("--samples", type=int, default=2, help="patches per volume")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="steps per measured job (CPU 8, CUDA 60)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-draw", action="store_true", help="skip the full-size patch draw (saves ~10 s on a CPU)")
    p.add_argument("--eval-shape", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"),
                   help="volume for the evaluation peak memory")
    p.add_argument("--eval-classes", type=int, nargs="+", default=[3, 14], help="class counts (background included)")
    p.add_argument("--skip-eval", action="store_true", help="skip the evaluation peak memory (~minutes on a CPU)")
    p.add_argument("--only-eval", action="store_true", help="only the evaluation peak memory")
    p.add_argument("--eval-child", type=int, default=None, help=argparse.SUPPRESS)  # one measurement, JSON out
    p.add_argument("--eval-old", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, metavar="OUT")
    return p.parse_args(argv)


def main(argv=None, echo=print) -> dict:
    import torch

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.eval_child is not None:  # one evaluation memory measurement for the parent: a JSON line
        got = eval_peak(args.eval_child, args.eval_shape, device, old=args.eval_old)
        print(json.dumps(got))
        return got
    cuda = device.type == "cuda"
    args.train_shape = args.train_shape or ([256, 256, 160] if cuda else [64, 64, 64])
    args.train_patch = args.train_patch or (96 if cuda else 32)
    args.steps = args.steps or (60 if cuda else 8)
    args.channels = (16, 32, 64, 128) if cuda else (8, 16, 32)
    echo(f"[executor] device {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
         + f", torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    from voxgrid.nodes.worker.patches import finish_prepared

    figures: dict = {"device": str(device)}
    if args.only_eval:
        figures["eval_memory"] = bench_eval_memory(args, device, echo)
        write_json(args.json, figures, "executor")
        return figures
    if not args.skip_draw:
        figures["draw"] = bench_draw(args, echo)
    data = [finish_prepared(volume(args.train_shape, seed=i), train=True) for i in range(args.volumes)]
    figures["epoch_prep"] = bench_epoch_prep(args, data, echo)
    figures["plain"] = bench_train(args, data, device, echo)
    if cuda:
        figures["bf16"] = bench_train(args, data, device, echo, amp=True)
    figures["dp"] = bench_train(args, data, device, echo, dp=True)
    plain = figures["plain"]
    echo(f"[executor] DP-SGD step / plain step: {figures['dp']['step_s'] / plain['step_s']:.1f}x")
    # The training thread's time on data: waiting for the loader's thread, or cropping on the GPU itself.
    share = (plain["wait_s"] + (plain["crop_s"] if plain["on_device"] else 0.0)) / plain["wall_s"]
    figures["data_share"] = share
    if not args.skip_eval:
        figures["eval_memory"] = bench_eval_memory(args, device, echo)
    write_json(args.json, figures, "executor")
    where = "in the training thread, on the GPU" if plain["on_device"] else "on a thread beside the step"
    echo(f"data path share of a training step on {device}: {share:.1%} "
         f"(cropping took {plain['crop_s'] / plain['wall_s']:.1%} of the wall time, {where})")
    return figures


if __name__ == "__main__":
    main()
