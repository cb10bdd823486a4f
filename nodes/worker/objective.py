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

Dynamic task prioritisation (``plan.local.dtp``, the multi-task pancreas study). A *task* is one
foreground class this site annotates (a pancreas-only site has one task, a pancreas + tumour site
two). Task c's loss is the plan's loss on the binary problem "c against everything else" (the
other channels merged as above), and the data loss is ``sum_c W_c * loss_c`` with
``W_c = -(1 - kbar_c)^gamma * log(kbar_c)``: ``kbar_c = alpha * Dice_c^r + (1 - alpha) * kbar_c``
is updated from each batch's soft Dice of class c (detached: the weights carry no gradient). The
moving average starts at the first batch of a job that contains class c; until then ``W_c = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from voxgrid.plan import Plan, TaskPriority, build_loss, prefixed_keys


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
    for w, g in zip(params, anchor, strict=True):
        sq = (w.float() - g.float()).pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError("proximal_term: no parameters")
    return 0.5 * mu * total


def dtp_weight(kbar: float, gamma: float) -> float:
    """DTP's focal weight ``-(1 - kbar)^gamma * log(kbar)`` of a task whose performance is ``kbar``.

    ``kbar`` is clamped to [1e-6, 1]: a task at Dice 0 gets a large finite weight, not infinity.
    """
    k = min(max(float(kbar), 1e-6), 1.0)
    return -((1.0 - k) ** gamma) * math.log(k)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[int], softmax: bool,
              eps: float = 1e-6) -> dict[int, float | None]:
    """Per class, the batch's soft Dice ``2 sum(p g) / (sum p + sum g)`` over all its voxels.

    Probabilities are the softmax over channels (``softmax``) or each channel's sigmoid. None for a
    class absent from the batch's targets (its Dice measures nothing there). No gradient.
    """
    with torch.no_grad():
        logits = logits.float()
        prob = torch.softmax(logits, dim=1) if softmax else torch.sigmoid(logits)
        out: dict[int, float | None] = {}
        for c in classes:
            g = (target[:, 0] == c).float()
            if g.sum() == 0:
                out[c] = None
                continue
            p = prob[:, c]
            out[c] = float(2 * (p * g).sum() / (p.sum() + g.sum() + eps))
        return out


class DynamicTaskPriority:
    """DTP's moving averages and weights over a site's tasks (its annotated classes).

    ``kbar``: the averages carried from the site's earlier rounds (updated in place), as the study's
    clients kept them through training; None starts afresh.
    """

    def __init__(self, spec: TaskPriority, tasks: Sequence[int], kbar: dict[int, float] | None = None):
        self.spec, self.tasks = spec, sorted(tasks)
        self.kbar: dict[int, float] = {} if kbar is None else kbar

    def observe(self, dice: dict[int, float | None]) -> None:
        """Fold one batch's Dice per task into the moving averages (None: task absent, unchanged)."""
        a, r = self.spec.alpha, self.spec.r
        for c, d in dice.items():
            if d is None:
                continue
            k = max(d, 0.0) ** r
            self.kbar[c] = k if c not in self.kbar else a * k + (1 - a) * self.kbar[c]

    def weights(self) -> dict[int, float]:
        """``W_c`` per task; 1 for a task not yet measured."""
        return {c: dtp_weight(self.kbar[c], self.spec.gamma) if c in self.kbar else 1.0 for c in self.tasks}


def freeze_except(net: torch.nn.Module, prefixes: Sequence[str]) -> list[torch.nn.Parameter]:
    """Stop gradients to every trainable parameter outside ``prefixes`` (``plan.local.train_only``);
    returns those it froze, for the caller to unfreeze. Nothing is frozen for empty ``prefixes``.

    A frozen parameter's gradient stays None, so torch's optimisers skip it (no step, no weight decay).
    Batch-norm running statistics still follow the site's data: they are not parameters.
    """
    if not prefixes:
        return []
    params = dict(net.named_parameters())
    train = prefixed_keys(set(params), prefixes, "plan.local.train_only")
    frozen = [p for n, p in params.items() if n not in train and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def network_device(net: torch.nn.Module) -> torch.device | None:
    """The device of ``net``'s parameters (else its buffers); None for a module holding no tensors."""
    for t in net.parameters():
        return t.device
    for t in net.buffers():
        return t.device
    return None


class LocalObjective:
    """``objective(net, x, y)``: the plan's loss on the annotated classes, plus the proximal term.

    Build it after loading the global weights into ``net``: they become FedProx's anchor.
    """

    def __init__(self, plan: Plan, present: set[int], net: torch.nn.Module,
                 dtp_state: dict[int, float] | None = None):
        if not present:
            raise ValueError(f"this dataset annotates none of the plan's classes {plan.labels[1:]}; "
                             "nothing to train on")
        self.present = sorted(present)
        partial = len(self.present) < len(plan.labels) - 1
        self.merge = is_softmax_loss(plan.loss)
        self.loss_fn = build_loss(plan, classes=[0, *self.present] if partial else None)
        self.mu = plan.local.proximal_mu
        # DTP with DP-SGD is refused when the plan is made (voxgrid.plan.dp_sgd_problems).
        self.dtp = DynamicTaskPriority(plan.local.dtp, self.present, dtp_state) if plan.local.dtp else None
        # one loss per task, over its 2 channels (background-or-other, the class)
        self.task_losses = {c: build_loss(plan, classes=[0, c]) for c in self.present} if self.dtp else {}
        # The losses' buffers (cross-entropy's class weights, Dice's class_weight) follow the network:
        # left on the CPU, a weighted loss fails on a CUDA network's logits.
        device = network_device(net)
        if device is not None:
            self.loss_fn = self.loss_fn.to(device)
            self.task_losses = {c: f.to(device) for c, f in self.task_losses.items()}
        self.params = [p for p in net.parameters() if p.requires_grad]
        # A copy, not a view: the anchor must not move as the optimiser steps.
        self.anchor = [p.detach().clone() for p in self.params] if self.mu > 0 else []

    def data_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The plan's loss on logits (B, C, *spatial) and index targets (B, 1, *spatial);
        with DTP, the weighted sum of the per-task losses (and the weights move with this batch)."""
        if self.dtp is None:
            return self.loss_fn(*restrict_to_annotated(logits, target, self.present, self.merge))
        self.dtp.observe(soft_dice(logits, target, self.present, self.merge))
        weights = self.dtp.weights()
        total = None
        for c in self.present:
            term = weights[c] * self.task_losses[c](*restrict_to_annotated(logits, target, [c], self.merge))
            total = term if total is None else total + term
        return total

    def proximal(self) -> torch.Tensor | None:
        return proximal_term(self.params, self.anchor, self.mu) if self.mu > 0 else None
