"""Pretrain a plan's network on volumes the scientist holds (public or synthetic), in this process.

The path to DP that learns (De et al. 2022; Tramèr & Boneh 2021): train on public data first,
then fine-tune privately at the nodes, starting from these weights
(``Experiment(plan, pointers, initial=pretrain(plan, public_volumes))``). The same plan components
as a node's training: the plan's network, loss, optimiser, preprocessing and augmentation, and
patches cropped foreground/background balanced as ``plan.pos_neg`` asks. No node and no privacy
budget is involved: the data are the scientist's own.

>>> weights = pretrain(plan, [make_phantom(public_site, i) for i in range(60)], epochs=30)  # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from voxgrid.datasets.volume import Volume
from voxgrid.plan import Plan, build_loss, build_network, build_optimizer, build_transforms, initial_weights
from voxgrid.tensors import StateDict, check_compatible

__all__ = ["pretrain", "prepare_volumes"]


def prepare_volumes(plan: Plan, volumes: Iterable[Volume], label_names: Mapping[int, str] | None = None) -> list[dict]:
    """Each labelled volume as the plan's preprocessing leaves it: dicts with image and label (1, X, Y, Z).

    ``label_names``: the volumes' label values -> class names; values whose name the plan does not
    list become background. Default: label values are the plan's class indices already.
    """
    from monai.data import MetaTensor
    from monai.transforms import Compose

    pre = Compose(build_transforms(plan.preprocessing)) if plan.preprocessing else None
    lut = np.arange(256, dtype=np.uint8) if label_names is None else np.zeros(256, dtype=np.uint8)
    for value, name in (label_names or {}).items():
        if name in plan.labels:
            lut[value] = plan.labels.index(name)
    items = []
    for i, v in enumerate(volumes):
        if v.label is None:
            raise ValueError(f"volume {i} has no label map; pretraining needs labels")
        affine = torch.as_tensor(np.asarray(v.affine), dtype=torch.float64)
        label = lut[np.asarray(v.label, dtype=np.int64)]
        if label.max(initial=0) >= len(plan.labels):
            raise ValueError(f"volume {i}: label value {int(label.max())} is not a class of the plan {plan.labels}")
        item = {"image": MetaTensor(torch.as_tensor(np.asarray(v.image, dtype=np.float32))[None], affine=affine),
                "label": MetaTensor(torch.as_tensor(label, dtype=torch.float32)[None], affine=affine)}
        items.append(pre(item) if pre is not None else item)
    if not items:
        raise ValueError("pretraining needs at least one labelled volume")
    return items


def _patches(plan: Plan, seed: int) -> Callable[[dict], list[dict]]:
    """The plan's training patches, as a node crops them: padded, pos/neg balanced, then augmented."""
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    keys = ["image", "label"]
    crop = Compose([SpatialPadd(keys=keys, spatial_size=plan.patch_size),
                    RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=plan.patch_size,
                                           pos=plan.pos_neg[0], neg=plan.pos_neg[1],
                                           num_samples=plan.samples_per_volume, allow_smaller=False),
                    *build_transforms(plan.augmentation)])
    crop.set_random_state(seed=seed)
    return crop


def pretrain(plan: Plan, volumes: Iterable[Volume], *, epochs: int = 10, seed: int = 0,
             initial: StateDict | None = None, label_names: Mapping[int, str] | None = None,
             device: str | torch.device = "cpu", echo: Callable[[str], None] | None = None) -> StateDict:
    """Train ``plan``'s network on ``volumes`` for ``epochs`` epochs; returns its state dict (CPU tensors).

    Each epoch: ``plan.samples_per_volume`` patches per volume (``plan.patch_size`` voxels), shuffled,
    in batches of ``plan.batch_size``, one optimiser step each (the plan's optimiser, fresh per call).
    Starts from ``initial`` (default: :func:`voxgrid.plan.initial_weights` under ``seed``). Deterministic
    for a given seed on the CPU. ``echo``: called with one line per epoch (mean loss).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    data = prepare_volumes(plan, volumes, label_names)
    start = initial if initial is not None else initial_weights(plan, seed=seed)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(plan)
        check_compatible(net.state_dict(), start)
        net.load_state_dict(start)
        net.to(device).train()
        loss_fn, opt = build_loss(plan).to(device), build_optimizer(plan, net.parameters())
        crop, rng = _patches(plan, seed), random.Random(seed)
        for epoch in range(epochs):
            samples = [s for item in data for s in crop(item)]
            rng.shuffle(samples)
            losses = []
            for i in range(0, len(samples), plan.batch_size):
                batch = samples[i:i + plan.batch_size]
                x = torch.stack([s["image"].as_tensor() for s in batch]).to(device)
                y = torch.stack([s["label"].as_tensor() for s in batch]).to(device)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(x), y)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            if echo:
                echo(f"[pretrain] epoch {epoch + 1}/{epochs}: mean loss {np.mean(losses):.4f} over {len(losses)} steps")
    return {k: t.detach().cpu().contiguous().clone() for k, t in net.state_dict().items()}
