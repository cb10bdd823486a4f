"""Local training and evaluation of a plan on one dataset, with MONAI and torch.

Runs inside the executor process. Volumes are loaded and preprocessed once per
(dataset, preprocessing) and kept in memory between rounds.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.transforms import Compose

from voxgrid.datasets import load_volume
from voxgrid.datasets.folder import DataRoots
from voxgrid.plan import Plan, build_network, dp_sgd_problems, build_optimizer, build_transforms, local_keys
from voxgrid.tensors import StateDict, check_compatible
from voxgrid.wire import Metrics

from voxgrid.privacy import PrivacySpec
from voxgrid.privacy.mechanisms import NonFiniteUpdate, secure_generator
from voxgrid.privacy.metrics import MetricsRelease, release_dice
from voxgrid.privacy.spec import DPSGD, TrainingContext

from voxgrid.nodes.worker.devices import resolve_device
from voxgrid.nodes.worker.dp import VmappedGradients, clipped_grad_sum, patient_chunk
from voxgrid.nodes.worker.local_state import LocalState
from voxgrid.nodes.worker.messages import VolumeSpec
from voxgrid.nodes.worker.objective import LocalObjective, freeze_except
from voxgrid.nodes.worker.patches import PatchLoader, finish_prepared, patch_crop


@dataclass
class PreparedData:
    """Preprocessed volumes of one dataset, per split: dicts with image (1,X,Y,Z) float and label (1,X,Y,Z)."""

    splits: dict[str, list[dict]]
    present: set[int]  # global class indices annotated at this site


def label_lut(site_labels: dict[int, str], plan: Plan) -> np.ndarray:
    """Map the site's label values onto the plan's class indices by name; unknown classes -> background."""
    lut = np.zeros(256, dtype=np.uint8)
    for value, name in site_labels.items():
        if name in plan.labels:
            lut[value] = plan.labels.index(name)
    return lut


def _prepare_one(v: VolumeSpec, pre, lut: np.ndarray) -> dict:
    vol = load_volume(v.source(), allow_resample=v.allow_resample)
    if vol.label is None:
        raise ValueError(f"volume {v.case_id} has no label map; training needs labels")
    affine = torch.as_tensor(vol.affine, dtype=torch.float64)
    item = {
        "image": MetaTensor(torch.as_tensor(vol.image, dtype=torch.float32)[None], affine=affine),
        "label": MetaTensor(torch.as_tensor(lut[vol.label.astype(np.int64)], dtype=torch.float32)[None], affine=affine),
    }
    return pre(item) if pre is not None else item


def prepare(volumes: Iterable[VolumeSpec | dict], site_labels: dict[int, str], plan: Plan, cache=None,
            roots: list[str] | None = None) -> PreparedData:
    """Load every volume of a dataset (:class:`.messages.VolumeSpec`, or its fields) and apply the plan's
    preprocessing (deterministic transforms).

    ``cache`` (a :class:`.prepcache.PrepCache`): take each prepared volume from the node's disk cache
    when its source, pipeline and label mapping are unchanged, and store the ones built.
    ``roots``: the node's data roots; a volume whose files now resolve outside them (a symlink swapped
    since registration) is refused before anything of it is read, from disk or from the cache."""
    allowed = DataRoots(roots or [])
    pre = Compose(build_transforms(plan.preprocessing)) if plan.preprocessing else None
    lut = label_lut(site_labels, plan)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for v in map(VolumeSpec.model_validate, volumes):
        allowed.check_source(v.source())
        # Labels uint8; a training volume's foreground/background indices computed once, cached with it.
        complete = partial(finish_prepared, train=v.split == "train")
        if cache is None:
            item = complete(_prepare_one(v, pre, lut))
        else:
            item = cache.fetch(v, plan.preprocessing, plan.labels, lut, lambda v=v: _prepare_one(v, pre, lut), complete)
        # The unit of privacy for DP-SGD: the volume's patient, else the volume itself (one volume, one patient).
        item = {**item, "patient": v.patient or v.case_id}
        splits[v.split].append(item)
    present = {plan.labels.index(n) for n in site_labels.values() if n in plan.labels}
    return PreparedData(splits, present)


def refuse_for_dp_sgd(plan: Plan, net: torch.nn.Module) -> None:
    """Raise ValueError naming what in the plan DP-SGD cannot train soundly (:func:`voxgrid.plan.dp_sgd_problems`).

    Plans are checked when made; this checks again with the network actually built at the node.
    """
    problems = dp_sgd_problems(plan, net)
    if problems:
        raise ValueError("DP-SGD (plan.privacy 'dp_sgd') cannot train this plan:\n" + "\n".join(problems))


def pick_device(requested: str = "auto", **probes) -> torch.device:
    """The worker's device: :func:`.devices.resolve_device` ("auto" falls back to the CPU with a warning
    saying why; ``probes``: its ``probe``, ``host_gpu`` and ``warn``, for tests)."""
    return torch.device(resolve_device(requested, **probes))


def dp_noise_generator(device: torch.device) -> torch.Generator:
    """DP-SGD's noise generator, on ``device`` (the gradients'), seeded from the OS's entropy (63 bits).

    Opacus draws the noise with ``torch.normal(..., device=<the gradient's device>, generator=gen)``,
    which refuses a generator of another device: a CPU generator fails the first step on a GPU.
    Never seeded from the scientist's seed: whoever knows the seed could subtract the noise.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return secure_generator()
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def _params_device(params: list[torch.Tensor], fallback: torch.device) -> torch.device:
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"DP-SGD: the trainable parameters span several devices {sorted(map(str, devices))}")
    return devices.pop() if devices else fallback


@dataclass(frozen=True)
class Precision:
    """How a job computes: ``dtype`` the autocast type (None: float32 throughout, no autocast);
    ``scaler``: float16 needs a GradScaler against underflowing gradients, bfloat16 does not."""

    dtype: torch.dtype | None = None
    scaler: bool = False

    @property
    def autocast(self) -> bool:
        return self.dtype is not None


def pick_precision(amp: bool, device: torch.device, bf16_supported: Callable[[], bool] | None = None) -> Precision:
    """The plan's ``amp`` on ``device``: on CUDA, bfloat16 autocast without a scaler where the GPU
    supports it (``bf16_supported``, default ``torch.cuda.is_bf16_supported``), else float16 with a
    GradScaler; float32 on any other device or without ``amp``."""
    if not amp or torch.device(device).type != "cuda":
        return Precision()
    if (bf16_supported or torch.cuda.is_bf16_supported)():
        return Precision(torch.bfloat16)
    return Precision(torch.float16, scaler=True)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> bool:
    """Backward and step; False when ``scaler`` skipped the step (inf/NaN gradients in float16: the
    scaler then lowers its scale and leaves the weights as they were)."""
    if scaler is None:
        loss.backward()
        opt.step()
        return True
    scaler.scale(loss).backward()
    before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale() >= before  # a skipped step backs the scale off; a done one keeps or grows it


class Trainer:
    """Keeps networks warm per plan hash; trains and evaluates jobs."""

    def __init__(self, device: torch.device, max_sw_batch_size: int | None = None,
                 bf16_supported: Callable[[], bool] | None = None):
        """``max_sw_batch_size``: the node's cap on the plan's ``sw_batch_size`` (windows per forward
        pass in evaluation), for its own GPU's memory; not part of the plan, so not of its hash.
        ``bf16_supported``: whether the GPU computes in bfloat16 (default: ask torch); see
        :func:`pick_precision`."""
        if max_sw_batch_size is not None and max_sw_batch_size < 1:
            raise ValueError(f"max_sw_batch_size must be >= 1, got {max_sw_batch_size}")
        self.device = device
        self.max_sw_batch_size = max_sw_batch_size
        self.bf16_supported = bf16_supported
        self._networks: dict[str, torch.nn.Module] = {}
        self._scalers: dict[str, torch.amp.GradScaler] = {}
        #: Training volumes on the device for crops there (None: when they fit, :func:`.patches.fits_on_device`).
        self.volumes_on_device: bool | None = None
        #: The last plain training job's data path: seconds waited for batches, seconds cropping, where.
        self.data_path: dict = {}

    def precision(self, plan: Plan) -> Precision:
        return pick_precision(plan.amp, self.device, self.bf16_supported)

    def scaler(self, plan: Plan) -> torch.amp.GradScaler | None:
        """float16's GradScaler, kept with the network from job to job: its scale is learned over more
        steps (growth every 2000 by default) than one job takes."""
        if not self.precision(plan).scaler:
            return None
        scaler = self._scalers.get(plan.content_hash)
        if scaler is None:
            scaler = torch.amp.GradScaler(self.device.type)
            self._scalers = {plan.content_hash: scaler}
        return scaler

    def network(self, plan: Plan, weights: StateDict) -> torch.nn.Module:
        net = self._networks.get(plan.content_hash)
        if net is None:
            net = build_network(plan).to(self.device)
            self._networks = {plan.content_hash: net}  # keep one: memory matters more than a rebuild
            self._scalers.pop(plan.content_hash, None)  # a new network: its scaler starts afresh too
        check_compatible(net.state_dict(), weights)
        net.load_state_dict(weights)
        return net

    def train(self, plan: Plan, net: torch.nn.Module, data: list[dict], seed: int,
              present: set[int], dtp_state: dict[int, float] | None = None) -> tuple[float | None, int]:
        """Local epochs of patch training from the weights in ``net``; returns (mean loss, optimiser steps).

        Steps that float16's GradScaler skipped (non-finite gradients) are not counted, nor is their
        loss (None when every step was skipped).

        ``present``: the plan classes this site annotates; the loss ignores the others (see
        :mod:`.objective`). The reported loss is the data loss, without FedProx's proximal term.
        ``dtp_state``: DTP's moving averages from the site's earlier rounds, updated in place.
        """
        if not data:
            raise ValueError("the dataset's train split is empty")
        spec = PrivacySpec.parse(plan.privacy)
        if spec is not None and spec.dp_sgd is not None:
            return self.train_dp_sgd(plan, net, data, seed, present, spec.dp_sgd)
        torch.manual_seed(seed)
        # Patches are cropped ahead of the step (a thread, or on the GPU), from cached indices (.patches).
        loader = PatchLoader(data, _patch_crop(plan, plan.samples_per_volume, seed), batch_size=plan.batch_size,
                             samples_per_volume=plan.samples_per_volume, seed=seed, device=self.device,
                             on_device=self.volumes_on_device)
        objective = LocalObjective(plan, present, net, dtp_state)
        opt = build_optimizer(plan, net.parameters())
        precision, scaler = self.precision(plan), self.scaler(plan)
        net.train()
        # Summed on the device, read once: float(loss) every step would make the host wait for the GPU.
        loss_sum, steps, skipped = torch.zeros((), device=self.device), 0, 0
        n_steps = plan.steps_per_epoch or loader.batches_per_pass(plan.samples_per_volume)
        for _ in range(plan.local_epochs):
            for x, y in loader.epoch(n_steps):  # y: uint8 class indices; the losses take them as they are
                opt.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, dtype=precision.dtype, enabled=precision.autocast):
                    data_loss = objective.data_loss(net(x), y)
                prox = objective.proximal()  # float32, outside autocast
                loss = data_loss if prox is None else data_loss + prox
                if optimizer_step(opt, loss, scaler):
                    loss_sum += data_loss.detach().float()  # the data loss: comparable across strategies
                    steps += 1
                else:
                    skipped += 1
        if skipped:
            logging.getLogger(__name__).warning("float16: the gradient scaler skipped %d of %d steps "
                                                "(non-finite gradients); they are not counted", skipped,
                                                steps + skipped)
        objective.sync_state()  # DTP's averages back into dtp_state: one read from the device a job
        self.data_path = {"wait_s": loader.wait_s, "crop_s": loader.crop_s, "on_device": loader.on_device}
        return (float(loss_sum) / steps if steps else None), steps

    def train_dp_sgd(self, plan: Plan, net: torch.nn.Module, data: list[dict], seed: int, present: set[int],
                     f: DPSGD) -> tuple[None, int]:
        """Patient-level DP-SGD (see :class:`voxgrid.privacy.spec.DPSGD`); returns (None, optimiser steps).

        Each step Poisson-samples the patients at rate q and takes K (``augmentation_multiplicity``)
        random patches of one random volume of each sampled patient; the mean of their gradients is
        the patient's gradient, clipped to ``max_grad_norm`` and summed (:mod:`.dp`). Opacus's
        ``DPOptimizer`` adds the Gaussian noise to the sum and divides by the expected batch
        (q * patients). A step with no patient sampled still adds its noise: the analysis counts
        every step.

        Per-patient gradients come from ``torch.func.vmap`` over a few sampled patients at a time
        (:mod:`.dp`; each patient's K views one batch), not from Opacus's ``GradSampleModule`` (3.4 times
        a plain step with its hooks, 2.9 with its functorch mode on the benchmark UNet); a patient's
        gradient cannot depend on the other patients whatever the loss does. Clipping streams (a running
        clipped sum, per-patient gradients for one chunk at a time, Opacus's clip formula); noise and
        scaling are Opacus's.
        FedProx's proximal term depends on the weights only, not on any patient: its gradient is
        added after the noise. No mixed precision (fp32 clipping).
        The training loss is not reported (None): it is a statistic of the patients released
        without noise.
        """
        from opacus.optimizers import DPOptimizer

        refuse_for_dp_sgd(plan, net)
        groups = _patient_groups(data)
        ctx = TrainingContext(len(groups), plan.batch_size, plan.local_epochs, plan.steps_per_epoch)
        (q, n_steps), sigma = f.schedule(ctx), f.sigma(ctx)  # sigma: derived here when the plan states a target
        torch.manual_seed(seed)
        # Who is sampled must stay secret (privacy amplification by subsampling assumes it), so the
        # sampling uses the OS's entropy, never the scientist's seed; noise too (dp_noise_generator).
        secret = secrets.SystemRandom()
        crop = _patch_crop(plan, f.augmentation_multiplicity, secret.randrange(2**31))  # K views per patient
        objective = LocalObjective(plan, present, net)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = DPOptimizer(build_optimizer(plan, params), noise_multiplier=sigma,
                          max_grad_norm=f.max_grad_norm, expected_batch_size=q * len(groups),
                          loss_reduction="mean", generator=dp_noise_generator(_params_device(params, self.device)))
        net.train()
        zeroed = 0
        # At most a plain step's batch of patches at once (what the node's limits vetted), and 8.
        chunk = patient_chunk(f.augmentation_multiplicity, sum(p.numel() for p in params),
                              patches=min(8, max(plan.batch_size, f.augmentation_multiplicity)))
        vmap_loss = objective.vmap_loss()  # None: a loss vmap cannot batch, one backward pass per patient
        batched = VmappedGradients(net, vmap_loss, params) if vmap_loss is not None and chunk > 1 else None
        try:
            for _ in range(n_steps):
                sampled = [g for g in groups if secret.random() < q]
                opt.zero_grad(set_to_none=True)
                summed, bad = clipped_grad_sum(net, objective.data_loss, params, sampled,
                                               lambda g: self._views(crop(secret.choice(g))), f.max_grad_norm,
                                               batched=batched, chunk=chunk)
                zeroed += bad
                for p, g in zip(params, summed, strict=True):  # zeros when nobody was sampled: noise only
                    p.summed_grad = g
                opt.add_noise()  # Opacus: p.grad = sum + N(0, (sigma * C)^2) ...
                for p in params:  # ... / (q * patients): Opacus's scale_grad, which reads grad_sample we never make
                    p.grad /= opt.expected_batch_size
                prox = objective.proximal()
                if prox is not None:
                    for p, g in zip(params, torch.autograd.grad(prox, params), strict=True):
                        p.grad += g
                opt.original_optimizer.step()
        finally:  # the network stays cached for the next job: leave no DP state on it
            for p in params:
                p.summed_grad = None
                p.grad_sample = None
        if zeroed:  # data-dependent: the node's log only, never the metrics
            logging.getLogger(__name__).warning("DP-SGD: %d non-finite per-patient gradients were zeroed", zeroed)
        return None, n_steps

    def _views(self, patches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """One patient's K augmented patches as (images, labels), each (K, 1, *patch), on the device."""
        x = torch.stack([s["image"].as_tensor() for s in patches]).to(self.device)
        y = torch.stack([s["label"].as_tensor() for s in patches]).to(self.device)
        return x, y

    @torch.no_grad()
    def evaluate(self, plan: Plan, net: torch.nn.Module, data: list[dict], present: set[int],
                 ignore_empty: bool = True) -> dict[str, float | None]:
        """Sliding-window inference and MONAI Dice per class (None for classes not annotated here).

        ``ignore_empty`` False: a volume without the class scores 1 if the prediction has none either,
        else 0, so every volume counts (the bounded-sensitivity mean of :mod:`voxgrid.privacy.metrics`).
        """
        net.eval()
        n_cls = len(plan.labels)
        metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=ignore_empty,
                            num_classes=n_cls)
        precision = self.precision(plan)
        sw_batch = plan.sw_batch_size if self.max_sw_batch_size is None else min(plan.sw_batch_size,
                                                                                 self.max_sw_batch_size)
        for item in data:
            x = item["image"].as_tensor()[None].to(self.device)
            with torch.autocast(self.device.type, dtype=precision.dtype, enabled=precision.autocast):
                logits = sliding_window_inference(x, roi_size=plan.patch_size, sw_batch_size=sw_batch,
                                                  predictor=net, overlap=plan.sw_overlap, padding_mode="constant")
            # Label maps (B, 1, X, Y, Z), not one-hot: a one-hot int64 volume is 8 bytes per voxel per class.
            pred = logits.argmax(1, keepdim=True)  # the first maximum, as on float32 logits
            if n_cls <= 256:
                pred = pred.to(torch.uint8)
            del logits
            metric(y_pred=pred, y=_label_indices(item["label"]).to(self.device)[None])
        scores = metric.aggregate().cpu().tolist() if data else [float("nan")] * (n_cls - 1)
        metric.reset()
        out: dict[str, float | None] = {}
        for c in range(1, n_cls):
            s = scores[c - 1]
            out[plan.labels[c]] = None if (c not in present or math.isnan(s)) else round(float(s), 6)
        return out


def _patient_groups(data: list[dict]) -> list[list[dict]]:
    """The prepared volumes grouped by patient (DP-SGD's unit of privacy; no patient: its own group)."""
    patients: dict[object, list[dict]] = {}
    for item in data:
        patients.setdefault(item.get("patient", id(item)), []).append(item)
    return list(patients.values())


def _patch_crop(plan: Plan, num_samples: int, seed: int) -> Compose:
    """The plan's training patches (:func:`.patches.patch_crop`: padded to the patch size, cropped
    foreground/background balanced around centres from the volume's cached indices, then the plan's
    augmentation)."""
    return patch_crop(plan.patch_size, plan.pos_neg, num_samples, build_transforms(plan.augmentation), seed)


def _label_indices(label: torch.Tensor) -> torch.Tensor:
    """A stored label map (1, X, Y, Z; float32 class indices) as uint8 indices, converted on the CPU
    before any copy to the device (1 byte per voxel; the plan's classes fit: ``label_lut`` is uint8)."""
    t = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
    return t if t.dtype == torch.uint8 else t.to(torch.uint8)


#: Where DTP's moving averages rest between rounds, beside the site-kept tensors (never sent).
DTP_KEY = "dtp.kbar"


def _kbar_tensor(kbar: dict[int, float], n_classes: int) -> torch.Tensor:
    """DTP's averages as a tensor indexed by class (NaN: not measured yet)."""
    t = torch.full((n_classes,), float("nan"), dtype=torch.float64)
    for c, k in kbar.items():
        t[c] = k
    return t


def _kbar_from(t: torch.Tensor | None) -> dict[int, float]:
    return {} if t is None else {c: float(k) for c, k in enumerate(t.tolist()) if not math.isnan(k)}


def check_update(delta: StateDict) -> None:
    """Raise :class:`NonFiniteUpdate` if an entry of the update is NaN or inf (before any filter runs)."""
    for k, t in delta.items():
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteUpdate(f"the update is not finite (NaN/inf in '{k}'); nothing was released")


def run_job(trainer: Trainer, plan: Plan, kind: str, data: PreparedData, weights: StateDict, *,
            split: str, evaluate: bool, seed: int, local_state: LocalState | None = None,
            job_key: tuple[str, str, int] | None = None,
            release: MetricsRelease | None = None) -> tuple[Metrics, StateDict | None]:
    """One job: train (+ optional validation) or evaluate. Returns metrics and the weight delta.

    ``release``: on a budgeted dataset, how the metrics may leave (noised Dice, withheld loss);
    the returned metrics are already in that form. A DP job's training loss is never reported.

    With ``plan.local.keep_local`` (FedBN), the site's own copy of those tensors replaces the
    global ones (from ``local_state`` under ``job_key`` = (experiment, dataset, round)), a train
    job stores the trained copy there, and their delta is zero: they never leave the node.
    With ``plan.local.dtp`` a train job carries DTP's moving averages there from round to round.
    """
    t0 = time.perf_counter()
    keep = local_keys(plan) if plan.local.keep_local else set()
    if keep and (local_state is None or job_key is None):
        raise ValueError("the plan keeps tensors at the site (plan.local.keep_local) but this node has no local state")
    carry_dtp = plan.local.dtp is not None and kind == "train" and local_state is not None and job_key is not None
    own = local_state.get(*job_key, inclusive=kind != "train") if keep or carry_dtp else None
    if keep and own is not None:
        weights = {**weights, **{k: own[k] for k in keep}}
    dtp_state = _kbar_from(own.get(DTP_KEY) if own else None) if carry_dtp else None
    net = trainer.network(plan, weights)
    loss, steps, delta, samples = None, 0, None, len(data.splits["train"])
    if kind == "train":
        frozen = freeze_except(net, plan.local.train_only)  # plan.local.train_only: e.g. fine-tune the head only
        try:
            loss, steps = trainer.train(plan, net, data.splits["train"], seed, data.present, dtp_state)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        trained = net.state_dict()
        delta = {k: (torch.zeros(weights[k].shape) if k in keep else trained[k].detach().float().cpu() - weights[k].float())
                 for k in weights}
        check_update(delta)
        kept = {k: trained[k] for k in keep}
        if carry_dtp:
            kept[DTP_KEY] = _kbar_tensor(dtp_state, len(plan.labels))
        if kept:
            local_state.put(*job_key, kept)
        score_split = "val" if evaluate else None
    else:
        score_split = split
        samples = len(data.splits[split])
    dice = trainer.evaluate(plan, net, data.splits[score_split], data.present,
                            ignore_empty=release is None) if score_split else {}
    if release is not None:
        dice = release_dice(dice, release, secure_generator())
    known = [v for v in dice.values() if v is not None]
    spec = PrivacySpec.parse(plan.privacy)
    if release is not None or (spec is not None and spec.dp):
        loss = None  # a statistic of the patients that no noise covers
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)  # the job's own GPU, not the current device
    metrics = Metrics(loss=loss, dice=dice, mean_dice=float(np.mean(known)) if known else None,
                      samples=samples, steps=steps, compute_s=time.perf_counter() - t0,
                      device=trainer.device.type)
    return metrics, delta
