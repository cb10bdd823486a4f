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

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from monai.losses import DiceCELoss

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


def soft_dice_tensor(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[int], softmax: bool,
                     eps: float = 1e-6) -> torch.Tensor:
    """Per class of ``classes``, the batch's soft Dice ``2 sum(p g) / (sum p + sum g)`` over all its
    voxels: a float32 tensor (len(classes),) on the logits' device, NaN for a class absent from the
    batch's targets. Probabilities: softmax over channels (``softmax``) or each channel's sigmoid.
    No gradient, and no host sync (DTP reads it every step)."""
    with torch.no_grad():
        prob = torch.softmax(logits.float(), dim=1) if softmax else torch.sigmoid(logits.float())
        out = []
        for c in classes:
            g = (target[:, 0] == c).float()
            p = prob[:, c]
            gs = g.sum()
            d = 2 * (p * g).sum() / (p.sum() + gs + eps)
            out.append(torch.where(gs > 0, d, torch.full_like(d, float("nan"))))
        return torch.stack(out) if out else torch.zeros(0, device=logits.device)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[int], softmax: bool,
              eps: float = 1e-6) -> dict[int, float | None]:
    """:func:`soft_dice_tensor` as numbers per class (None: absent from the batch's targets)."""
    values = soft_dice_tensor(logits, target, classes, softmax, eps).tolist()
    return {c: (None if math.isnan(v) else v) for c, v in zip(classes, values, strict=True)}


class DynamicTaskPriority:
    """DTP's moving averages and weights over a site's tasks (its annotated classes).

    ``kbar``: the averages carried from the site's earlier rounds, as the study's clients kept them
    through training; None starts afresh. The averages live in a tensor on the device of the Dice
    they are fed (:meth:`observe_tensor`, every training step, without a host sync); :attr:`kbar`
    reads them back into that same dict (one sync: read it once a job, not every step).
    """

    def __init__(self, spec: TaskPriority, tasks: Sequence[int], kbar: dict[int, float] | None = None):
        self.spec, self.tasks = spec, sorted(tasks)
        self._kbar: dict[int, float] = {} if kbar is None else kbar
        self._k: torch.Tensor | None = None  # (tasks,) float32, NaN: not measured yet

    def _state(self, device: torch.device) -> torch.Tensor:
        if self._k is None:
            self._k = torch.tensor([self._kbar.get(c, float("nan")) for c in self.tasks], dtype=torch.float32)
        if self._k.device != torch.device(device):
            self._k = self._k.to(device)
        return self._k

    def observe_tensor(self, dice: torch.Tensor) -> None:
        """Fold one batch's Dice per task ((tasks,) in :attr:`tasks` order, NaN: absent) into the averages."""
        a, r = self.spec.alpha, self.spec.r
        k_old = self._state(dice.device)
        k = dice.float().clamp(min=0.0) ** r
        updated = torch.where(torch.isnan(k_old), k, a * k + (1 - a) * k_old)
        self._k = torch.where(torch.isnan(dice), k_old, updated)

    def observe(self, dice: dict[int, float | None]) -> None:
        """:meth:`observe_tensor` for Dice given as numbers per task (None: task absent, unchanged)."""
        self.observe_tensor(torch.tensor([float("nan") if dice.get(c) is None else float(dice[c])
                                          for c in self.tasks], dtype=torch.float32))

    def weights_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``W_c`` per task, (tasks,) float32 on the averages' device; 1 for a task not yet measured."""
        k = self._state(device if self._k is None else self._k.device)
        kc = k.clamp(1e-6, 1.0)
        w = -((1.0 - kc) ** self.spec.gamma) * torch.log(kc)
        return torch.where(torch.isnan(k), torch.ones_like(k), w)

    @property
    def kbar(self) -> dict[int, float]:
        """The averages per measured task: the dict given at construction, brought up to date."""
        if self._k is not None:
            for c, v in zip(self.tasks, self._k.tolist(), strict=True):
                if not math.isnan(v):
                    self._kbar[c] = v
        return self._kbar

    def weights(self) -> dict[int, float]:
        """``W_c`` per task; 1 for a task not yet measured."""
        return dict(zip(self.tasks, self.weights_tensor().tolist(), strict=True))


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


def _vmaps(loss, channels: int, device: torch.device | None) -> bool:
    """Whether ``loss`` runs under vmap (GeneralizedDiceLoss, for one, indexes with a boolean mask)."""
    from torch.func import vmap

    logits = torch.zeros(2, 1, channels, 2, 2, 2, device=device)
    try:
        vmap(loss)(logits, torch.zeros(2, 1, 1, 2, 2, 2, dtype=torch.uint8, device=device))
    except Exception:  # noqa: BLE001 (whatever the reason, the per-patient loop is the safe way)
        return False
    return True


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
        self.classes = len(plan.labels)
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
        # On the device, without a host sync: the weights are tensors, read back once a job (sync_state).
        self.dtp.observe_tensor(soft_dice_tensor(logits, target, self.present, self.merge))
        weights = self.dtp.weights_tensor()
        total = None
        for i, c in enumerate(self.present):
            term = weights[i] * self.task_losses[c](*restrict_to_annotated(logits, target, [c], self.merge))
            total = term if total is None else total + term
        return total

    def vmap_loss(self):
        """``data_loss`` for :func:`torch.func.vmap`, or None where it has no such form (DTP, a loss not
        built with ``to_onehot_y``). The same value on the same inputs (tested for every allowlisted
        loss): the target is one-hot encoded by comparison, out of place, where MONAI's ``to_onehot_y``
        scatters into a fresh tensor in place, which vmap cannot batch."""
        if self.dtp is not None:
            return None
        plain = copy.deepcopy(self.loss_fn)
        flagged = [m for m in plain.modules() if hasattr(m, "to_onehot_y")]
        if not any(m.to_onehot_y for m in flagged):  # index targets all the way down: nothing to replace
            return None
        for m in flagged:
            m.to_onehot_y = False
        present, merge = self.present, self.merge

        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            logits, target = restrict_to_annotated(logits, target, present, merge)
            classes = torch.arange(logits.shape[1], device=target.device, dtype=target.dtype)
            onehot = (target == classes.view(1, -1, *([1] * (target.dim() - 2)))).to(logits.dtype)
            if isinstance(plain, DiceCELoss):  # its cross-entropy takes the class indices, as with to_onehot_y
                return plain.lambda_dice * plain.dice(logits, onehot) + plain.lambda_ce * plain.ce(logits, target)
            return plain(logits, onehot)

        return loss if _vmaps(loss, self.classes, self.params[0].device if self.params else None) else None

    def sync_state(self) -> None:
        """Bring the state carried between rounds (DTP's averages, the dict given) up to date from the
        device: once at the end of a job."""
        if self.dtp is not None:
            self.dtp.kbar  # noqa: B018 (the property writes the averages back)

    def proximal(self) -> torch.Tensor | None:
        return proximal_term(self.params, self.anchor, self.mu) if self.mu > 0 else None
