"""Server-side adaptive optimisers on the averaged delta: FedAdam and FedYogi (Reddi et al. 2021).

Each round (Algorithm 2 of "Adaptive Federated Optimization", no bias correction):

    Delta = sum_k n_k delta_k / sum_k n_k                  (pseudo-gradient; a descent direction)
    m     = beta1 * m + (1 - beta1) * Delta                (m starts at 0)
    v     = beta2 * v + (1 - beta2) * Delta^2              (Adam)
    v     = v - (1 - beta2) * Delta^2 * sign(v - Delta^2)  (Yogi)       (v starts at tau^2)
    w     = w + lr * m / (sqrt(v) + tau)

Integer buffers and batch-norm running statistics get the plain average instead.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from voxgrid.strategies.base import (ClientUpdate, Strategy, StrategyState, apply_delta, is_statistic,
                                     sample_weights, weighted_delta)
from voxgrid.tensors import StateDict


@dataclass
class _FedOpt(Strategy):
    """Shared by FedAdam and FedYogi; subclasses define :meth:`second_moment`."""

    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    _m: StateDict = field(default_factory=dict, init=False, repr=False)
    _v: StateDict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        ok = {"lr": self.lr > 0, "beta1": 0 <= self.beta1 < 1, "beta2": 0 <= self.beta2 < 1, "tau": self.tau > 0}
        for arg, good in ok.items():
            v = getattr(self, arg)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and good):
                raise ValueError(f"{type(self).__name__}: invalid {arg}={v!r} (need lr > 0, 0 <= beta < 1, tau > 0)")

    @abstractmethod
    def second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        """The new second moment from the previous one ``v`` and the squared pseudo-gradient ``g2``."""

    secure_weight = "samples"

    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        return self.apply_mean(global_weights, weighted_delta(updates, sample_weights(updates)))

    def apply_mean(self, global_weights: StateDict, delta: StateDict) -> StateDict:
        """One server optimiser step on the weighted mean delta (the pseudo-gradient)."""
        step: StateDict = {}
        m_new: StateDict = {}
        v_new: StateDict = {}
        for key, d in delta.items():
            if is_statistic(key, global_weights[key]):
                step[key] = d
                continue
            m = self._m.get(key, torch.zeros_like(d))
            v = self._v.get(key, torch.full_like(d, self.tau ** 2))
            m_new[key] = self.beta1 * m + (1 - self.beta1) * d
            v_new[key] = self.second_moment(v, d * d)
            step[key] = self.lr * m_new[key] / (v_new[key].sqrt() + self.tau)
        new = apply_delta(global_weights, step)
        self._m, self._v = m_new, v_new  # only once the whole step succeeded
        return new

    def state_dict(self) -> StrategyState:
        tensors = {f"m/{k}": t for k, t in self._m.items()} | {f"v/{k}": t for k, t in self._v.items()}
        return StrategyState(tensors=tensors)

    def load_state_dict(self, state: StrategyState) -> None:
        bad = [k for k in state.tensors if not k.startswith(("m/", "v/"))]
        if bad or state.meta:
            raise ValueError(f"{self.name} state: expected only 'm/<param>' and 'v/<param>' tensors, got {bad[:3]}")
        self._m = {k[2:]: t.float() for k, t in state.tensors.items() if k.startswith("m/")}
        self._v = {k[2:]: t.float() for k, t in state.tensors.items() if k.startswith("v/")}


@dataclass
class FedAdam(_FedOpt):
    """Server-side Adam on the averaged delta."""

    name = "fedadam"

    def second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * g2


@dataclass
class FedYogi(_FedOpt):
    """Server-side Yogi: v moves towards Delta^2 by an additive step, so it grows slowly after spikes."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * g2 * torch.sign(v - g2)
