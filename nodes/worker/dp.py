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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def patient_loss(net: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the K views of the per-view loss; ``x`` (K, 1, *patch) images, ``y`` (K, 1, *patch) labels."""
    logits = net(x)
    k = x.shape[0]
    if k == 1:
        return loss_fn(logits, y)
    return sum(loss_fn(logits[i:i + 1], y[i:i + 1]) for i in range(k)) / k


def patient_gradient(net: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """One patient's gradient, the mean of its K views' gradients (zeros for unused parameters)."""
    grads = torch.autograd.grad(patient_loss(net, loss_fn, x, y), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def clip_factor(grads: Sequence[torch.Tensor], max_grad_norm: float) -> float:
    """``min(1, C / (||g|| + 1e-6))`` over all of one patient's gradient (Opacus's formula); 0.0 for a
    non-finite gradient: a NaN/inf would poison the sum, and failing would leak which patient caused it."""
    norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads)))))
    if not math.isfinite(norm):
        return 0.0
    return min(1.0, max_grad_norm / (norm + 1e-6))


def clipped_grad_sum(net: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     params: Sequence[torch.Tensor], patients: Sequence[T],
                     views: Callable[[T], tuple[torch.Tensor, torch.Tensor]], max_grad_norm: float
                     ) -> tuple[list[torch.Tensor], int]:
    """The sum over sampled ``patients`` of their gradients, each clipped to L2 norm ``max_grad_norm``.

    ``views(patient)``: its (images (K, 1, *patch), labels (K, 1, *patch)) on the network's device,
    made one patient at a time, so one patient's views and one gradient are in memory, not a
    (patients, *shape) buffer per parameter. Returns a tensor per parameter (zeros when nobody was
    sampled: the step still adds its noise) and how many non-finite patient gradients were zeroed.
    """
    total = [torch.zeros_like(p) for p in params]
    zeroed = 0
    for patient in patients:
        grads = patient_gradient(net, loss_fn, params, *views(patient))
        factor = clip_factor(grads, max_grad_norm)
        zeroed += factor == 0.0
        if factor > 0:
            torch._foreach_add_(total, grads, alpha=factor)
    return total, zeroed
