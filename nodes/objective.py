"""The loss a node minimises: the plan's loss restricted to the classes this site annotates,
plus the client-side terms a strategy asks for in ``plan.local`` (FedProx's proximal term).

Partial labels. A site that does not annotate a plan class has that class's voxels labelled
background, so training the plain loss would teach the shared model to call it background. We
transform logits and targets, not the loss, so every allowlisted MONAI loss works unchanged:

* softmax losses (``softmax=True``; FocalLoss ``use_softmax=True``): the *marginal loss* of
  partially-labelled multi-organ work (Shi et al. 2021; Fang & Yan 2020). The un-annotated
  classes are merged into background, ``logit_bg' = logsumexp(logit_bg, logit_missing...)``, so
  softmax over the remaining channels gives ``p_bg' = p_bg + sum p_missing``: a voxel labelled
  background is correct whether the model calls it background or an un-annotated class.
* other losses (sigmoid or none, channels independent): the un-annotated channels are dropped,
  so they get no supervision here.

Targets are re-indexed onto the kept channels; a per-class ``weight`` list is restricted to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from voxgrid.plan import Plan, build_loss


def is_softmax_loss(spec: dict) -> bool:
    """Whether the loss normalises over channels with a softmax (then merging is the sound choice)."""
    return bool(spec.get("softmax") or spec.get("use_softmax"))


def restrict_to_annotated(logits: torch.Tensor, target: torch.Tensor, present: Sequence[int],
                          merge: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C, *spatial) and index targets (B, 1, *spatial) over the site's classes only.

    ``present``: global indices (>= 1) of the classes the site annotates; background is 0.
    Returns logits (B, 1 + len(present), *spatial), channel 0 the (merged) background, and
    targets re-indexed to those channels (same dtype as given).
    """
    n_cls = logits.shape[1]
    kept = sorted(set(present))
    missing = [c for c in range(1, n_cls) if c not in kept]
    if not missing:
        return logits, target
    if merge:
        bg = torch.logsumexp(logits[:, [0, *missing]].float(), dim=1, keepdim=True).to(logits.dtype)
    else:
        bg = logits[:, :1]
    out = torch.cat([bg, logits[:, kept]], dim=1)
    lut = torch.zeros(n_cls, dtype=torch.long, device=target.device)  # missing classes never occur: background
    lut[kept] = torch.arange(1, len(kept) + 1, device=target.device)
    return out, lut[target.long()].to(target.dtype)


def proximal_term(params: Iterable[torch.Tensor], anchor: Iterable[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: ``mu / 2 * sum ||w - w_global||^2`` over parameter tensors, in float32 (a scalar)."""
    total = None
    for w, g in zip(params, anchor):
        sq = (w.float() - g.float()).pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError("proximal_term: no parameters")
    return 0.5 * mu * total


class LocalObjective:
    """``objective(net, x, y)``: the plan's loss on the annotated classes, plus the proximal term.

    Build it after loading the global weights into ``net``: they become FedProx's anchor.
    """

    def __init__(self, plan: Plan, present: set[int], net: torch.nn.Module):
        if not present:
            raise ValueError(f"this dataset annotates none of the plan's classes {plan.labels[1:]}; "
                             "nothing to train on")
        self.present = sorted(present)
        partial = len(self.present) < len(plan.labels) - 1
        self.merge = is_softmax_loss(plan.loss)
        self.loss_fn = build_loss(plan, classes=[0, *self.present] if partial else None)
        self.mu = plan.local.proximal_mu
        self.params = [p for p in net.parameters() if p.requires_grad]
        # A copy, not a view: the anchor must not move as the optimiser steps.
        self.anchor = [p.detach().clone() for p in self.params] if self.mu > 0 else []

    def data_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The plan's loss on logits (B, C, *spatial) and index targets (B, 1, *spatial)."""
        return self.loss_fn(*restrict_to_annotated(logits, target, self.present, self.merge))

    def proximal(self) -> torch.Tensor | None:
        return proximal_term(self.params, self.anchor, self.mu) if self.mu > 0 else None
