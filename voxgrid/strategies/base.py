"""What every strategy shares: the update type, the base class, its state, and delta arithmetic.

An update is a weight *delta* (local weights minus the global weights the job started from),
so every strategy maps ``(global weights, updates) -> new global weights``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from voxgrid.tensors import StateDict

if TYPE_CHECKING:
    from voxgrid.plan import Plan

# Batch-norm statistics are running averages, not parameters driven by a gradient: strategies
# that transform the averaged delta (server optimisers) pass these through as plain averages.
_STATISTIC_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


@dataclass(frozen=True)
class ClientUpdate:
    """What one node released for one round.

    ``metrics`` is the node's :class:`voxgrid.wire.Metrics` as a dict: ``loss`` (mean local
    training loss), ``mean_dice`` (on its validation split, None when not evaluated), ...
    """

    node: str
    dataset: str
    delta: StateDict
    samples: int
    metrics: dict = field(default_factory=dict)

    @property
    def site(self) -> str:
        """``dataset@node``: the key strategies keep per-site state under (as ``SiteResult.site``)."""
        return f"{self.dataset}@{self.node}"


@dataclass(frozen=True)
class StrategyState:
    """A strategy's memory between rounds, in checkpointable form (never pickled).

    ``tensors`` are saved as safetensors, ``meta`` as JSON (str keys, JSON values only).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


class Strategy(ABC):
    """Base class: subclasses implement :meth:`aggregate`.

    Subclasses are dataclasses whose init fields are their hyper-parameters; :meth:`config`
    lists them, and ``voxgrid.strategies.from_config`` rebuilds the strategy from that JSON.
    """

    name = "strategy"
    #: How each node weights its update when the aggregator may see only the weighted sum (secure
    #: aggregation): ``"samples"`` (training samples) or ``"val_dice"`` (its validation mean Dice).
    #: None: the rule needs individual updates, and :attr:`secure_refusal` says why.
    secure_weight: ClassVar[Literal["samples", "val_dice"] | None] = None
    secure_refusal: ClassVar[str] = "it needs every node's own update, which secure aggregation hides"
    #: True: the model visits the sites one after another (each a train job from the previous one's
    #: weights, :mod:`voxgrid.sequential`) and the strategy has ``visits(round, n_sites) -> [index]``;
    #: False: every site trains from the same global weights and :meth:`aggregate` combines them.
    sequential: ClassVar[bool] = False

    @abstractmethod
    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        """The new global weights from the current ones and this round's updates."""

    def apply_mean(self, global_weights: StateDict, mean_delta: StateDict) -> StateDict:
        """The new global weights from the federation's weighted mean delta alone.

        Secure aggregation calls this with the unmasked sum divided by the total weight; sum-based
        rules implement :meth:`aggregate` as ``apply_mean(global, weighted_delta(...))`` so both
        paths share one step.
        """
        raise TypeError(f"strategy {self.name!r} cannot run under secure aggregation: {self.secure_refusal}")

    def train_jobs_per_round(self) -> int:
        """Train jobs each site runs per round; each is a release its node accounts (budgets, approvals)."""
        return 1

    def configure_plan(self, plan: Plan) -> Plan:
        """The plan the nodes should run: lets a strategy set client-side options (``plan.local``).

        Called once by the Experiment, and again on resume, so it must be idempotent.
        """
        return plan

    def config(self) -> dict:
        """JSON description stored in checkpoints and results: the name and hyper-parameters."""
        params = {}
        if dataclasses.is_dataclass(self):
            params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {"name": self.name, **params}

    def state_dict(self) -> StrategyState:
        """State carried between rounds (moments, loss histories); stateless by default."""
        return StrategyState()

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore what :meth:`state_dict` returned (from a checkpoint)."""
        if state.tensors or state.meta:
            raise ValueError(f"strategy {self.name!r} keeps no state, but a state was given "
                             f"(tensors {sorted(state.tensors)[:3]}, meta keys {sorted(state.meta)[:3]})")


def sample_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """Training-sample counts, or equal weights when no update reports any."""
    weights = [float(max(u.samples, 0)) for u in updates]
    return weights if sum(weights) > 0 else [1.0] * len(updates)


def weighted_delta(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> StateDict:
    """sum_k w_k * delta_k / sum_k w_k (one weight per update), accumulated in place in (at least) float32."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {list(weights)}")
    out: StateDict = {}
    for key, ref in updates[0].delta.items():
        acc = torch.zeros(ref.shape, dtype=torch.promote_types(ref.dtype, torch.float32))
        for u, w in zip(updates, weights, strict=True):
            acc.add_(u.delta[key], alpha=w / total)  # in place: no temporaries the size of the model
        out[key] = acc
    return out


def apply_delta(global_weights: StateDict, delta: StateDict) -> StateDict:
    """global + delta, cast back to each tensor's dtype (integer buffers are rounded)."""
    new: StateDict = {}
    for key, g in global_weights.items():
        d = delta[key]
        if g.is_floating_point():
            new[key] = (g + d).to(g.dtype)
        else:
            new[key] = (g.to(torch.float64) + d).round().to(g.dtype)
    return new


def is_statistic(key: str, tensor: torch.Tensor) -> bool:
    """True for integer buffers and batch-norm running statistics (not gradient-trained)."""
    return not tensor.is_floating_point() or key.endswith(_STATISTIC_SUFFIXES)
