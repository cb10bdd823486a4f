"""Per-patient gradients for DP-SGD, with augmentation multiplicity (De et al. 2022).

A sampled patient contributes K augmented patches ("views"); their gradients are averaged into
the patient's one gradient *before* clipping, so one patient still moves the sum by at most
``max_grad_norm`` and the accounting is that of K = 1. Averaging views lowers the variance of
the patient's gradient without adding any noise, which is what lets large-batch DP-SGD learn.

The K views go through the network as one batch (a forward pass of K is cheaper than K of
one); the loss is the mean of the K per-view losses, each computed on its own slice, so the
gradient is exactly the mean of the per-view gradients whatever the loss reduces over its batch
(e.g. DiceLoss with ``batch=True``). Normalisation must be per sample (group, instance or layer
norm: :func:`voxgrid.plan.dp_sgd_problems` refuses batch norm), so views do not mix.

Several patients go through the network together under ``torch.func.vmap`` (``chunk`` at a time):
each patient's gradient is still computed from its own views alone, but the convolutions see a
batch. On the CPU this matters more than the batch's arithmetic: for a batch of one small 3D input
torch picks its slow reference convolution over oneDNN's, so one backward pass per patient made a
DP-SGD step 2.2-2.7 times a plain one; vmapped, 1.3-1.8 times (``benchmarks/dp_step.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def patient_loss(net: Callable[[torch.Tensor], torch.Tensor], loss_fn: Loss, x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """Mean over the K views of the per-view loss; ``x`` (K, 1, *patch) images, ``y`` (K, 1, *patch) labels."""
    logits = net(x)
    k = x.shape[0]
    if k == 1:
        return loss_fn(logits, y)
    return sum(loss_fn(logits[i:i + 1], y[i:i + 1]) for i in range(k)) / k


def patient_gradient(net: torch.nn.Module, loss_fn: Loss, params: Sequence[torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> list[torch.Tensor]:
    """One patient's gradient, the mean of its K views' gradients (zeros for unused parameters)."""
    grads = torch.autograd.grad(patient_loss(net, loss_fn, x, y), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


class VmappedGradients:
    """``grads(x, y)``: for x, y (patients, K, 1, *patch), each patient's gradient, one tensor
    (patients, *param shape) per parameter, or None where this network cannot be vmapped (some of
    MONAI's networks add in place into captured tensors: AttentionUnet, VNet) or several patients do
    not fit in memory; after the first such failure ``usable`` is False for the job.

    ``loss_fn`` must be vmap-safe (:meth:`LocalObjective.vmap_loss`); dropout draws differ per patient,
    as in a loop."""

    def __init__(self, net: torch.nn.Module, loss_fn: Loss, params: Sequence[torch.Tensor]):
        from torch.func import functional_call, grad, vmap

        ids = {id(p) for p in params}
        self.names = [n for n, p in net.named_parameters() if id(p) in ids]
        self.params = params
        fixed = {n: p.detach() for n, p in net.named_parameters() if id(p) not in ids} | dict(net.named_buffers())

        def one(trainable: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return patient_loss(lambda v: functional_call(net, (trainable, fixed), (v,)), loss_fn, x, y)

        self._per_patient = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")
        self.usable = True

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor] | None:
        if not self.usable:
            return None
        try:
            out = self._per_patient({n: p.detach() for n, p in zip(self.names, self.params, strict=True)}, x, y)
        except RuntimeError as exc:  # the network's code, or memory for several patients: not any one patient's
            self.usable = False
            why = "out of memory for several patients at once" if isinstance(exc, torch.OutOfMemoryError) else \
                f"the network cannot be vmapped: {str(exc).splitlines()[0][:200]}"
            logging.getLogger(__name__).warning("DP-SGD: %s; one backward pass per patient", why)
            return None
        return [out[n] for n in self.names]


def patient_chunk(views: int, trainable: int, grad_bytes: int = 256 * 2**20, patches: int = 8) -> int:
    """How many patients to vmap together: at most ``patches`` patches in the batch (a plain step's
    order of magnitude) and ``grad_bytes`` of float32 per-patient gradients (``trainable`` elements each)."""
    return max(1, min(patches // max(views, 1), grad_bytes // max(4 * trainable, 1)))


def clip_factors(grads: Sequence[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    """Per patient ``min(1, C / (||g|| + 1e-6))`` over all of its gradient (Opacus's formula), from one
    tensor (patients, *shape) per parameter; 0 for a non-finite gradient: a NaN/inf would poison the
    sum, and failing would leak which patient caused it."""
    norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))


def clip_factor(grads: Sequence[torch.Tensor], max_grad_norm: float) -> float:
    """:func:`clip_factors` for one patient's gradient (one tensor per parameter)."""
    return float(clip_factors([g[None] for g in grads], max_grad_norm)[0])


def clipped_grad_sum(net: torch.nn.Module, loss_fn: Loss, params: Sequence[torch.Tensor], patients: Sequence[T],
                     views: Callable[[T], tuple[torch.Tensor, torch.Tensor]], max_grad_norm: float, *,
                     batched: VmappedGradients | None = None, chunk: int = 1) -> tuple[list[torch.Tensor], int]:
    """The sum over sampled ``patients`` of their gradients, each clipped to L2 norm ``max_grad_norm``.

    ``views(patient)``: its (images (K, 1, *patch), labels (K, 1, *patch)) on the network's device.
    With ``batched`` (made once a job) ``chunk`` patients at a time go through the network together,
    so ``chunk`` patients' views and gradients are in memory at once; otherwise (or where the network
    cannot be vmapped) one backward pass per patient. Returns a tensor per parameter (zeros when
    nobody was sampled: the step still adds its noise) and how many non-finite patient gradients were zeroed.
    """
    total = [torch.zeros_like(p) for p in params]
    zeroed = 0
    step = chunk if batched is not None and batched.usable else 1
    for i in range(0, len(patients), step):
        group = [views(p) for p in patients[i:i + step]]
        grads = batched(torch.stack([x for x, _ in group]), torch.stack([y for _, y in group])) if step > 1 else None
        if grads is None:
            each = [patient_gradient(net, loss_fn, params, x, y) for x, y in group]
            grads = [torch.stack(g) if len(g) > 1 else g[0][None] for g in zip(*each, strict=True)]
        factors = clip_factors(grads, max_grad_norm)
        bad = int((factors == 0).sum())  # one read a chunk: a zeroed patient's NaNs must not reach the sum
        zeroed += bad
        for t, g in zip(total, grads, strict=True):
            if bad:
                g = torch.where(factors.view((-1,) + (1,) * (g.dim() - 1)) > 0, g, torch.zeros_like(g))
            t += torch.tensordot(factors.to(g.dtype), g, dims=1)
    return total, zeroed
