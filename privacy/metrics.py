"""The numbers a job reports about a budgeted dataset are releases too: how each one leaves.

On a dataset with a budget, a job's metrics pass one of three ways, stated on its receipt:

* ``noised``: the per-class Dice goes out with Gaussian noise, and its cost is in the ledger.
  The released value for class c is the mean over the split's n volumes of each volume's Dice
  (a volume with an empty ground truth scores 1 if the prediction is empty too, else 0, so every
  volume counts and n, a published count, stays fixed). Replacing one patient with m volumes moves
  each class's mean by at most m / n, the k-class vector by at most ``m * sqrt(k) / n`` in L2:
  the noise std is ``noise_multiplier`` times that. Without this, a model that predicts one class
  everywhere turns the reported Dice into a patient's exact organ volume.
* ``withheld``: not reported (the training loss, which no noise calibration covers).
* ``exact``: no budget applies to this dataset and scientist, so nothing is accounted.

Pure functions; the node computes the release terms at submission and the worker applies them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .accountant import GaussianEvent

MECHANISM = "gaussian_dice"
Handling = Literal["noised", "withheld", "exact", "not computed"]


class MetricsRelease(BaseModel):
    """How one job's metrics leave the node; recorded in its ledger entry and shown on its receipt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mechanism: Literal["gaussian_dice"] = MECHANISM
    dice: Handling = Field(description="the per-class Dice (and their mean)")
    loss: Handling = Field(description="the training loss")
    split: str | None = Field(None, description="the split the Dice is scored on")
    noise_multiplier: float | None = Field(None, gt=0, description="noise std / L2 sensitivity (unitless)")
    sensitivity: float | None = Field(None, gt=0, description="L2 sensitivity of the per-class Dice vector")
    delta: float | None = Field(None, gt=0, lt=1, description="the delta the receipt's epsilon is stated at")

    @property
    def std(self) -> float:
        """Noise std added to each class's Dice (0 when the Dice is not noised)."""
        return self.noise_multiplier * self.sensitivity if self.dice == "noised" else 0.0

    def events(self) -> list[GaussianEvent]:
        """The accountant event of the noised Dice (one unsampled Gaussian release), if any."""
        return [GaussianEvent(self.noise_multiplier, 1.0, 1)] if self.dice == "noised" else []

    @classmethod
    def in_parameters(cls, parameters: Iterable[dict[str, Any]]) -> MetricsRelease | None:
        """The release recorded among a ledger entry's parameters, if any."""
        found = [p for p in parameters if p.get("mechanism") == MECHANISM]
        return cls.model_validate(found[0]) if found else None


def dice_sensitivity(volumes: Iterable[Any], split: str, classes: int) -> float:
    """L2 sensitivity of the mean per-class Dice over ``split`` (records with ``split``, ``case_id``, ``patient``)."""
    per_patient = Counter(getattr(v, "patient", None) or v.case_id for v in volumes if v.split == split)
    n = sum(per_patient.values())
    if n == 0 or classes < 1:
        raise ValueError(f"no volumes in split {split!r} or no classes to score")
    return max(per_patient.values()) * math.sqrt(classes) / n


def release_dice(dice: dict[str, float | None], release: MetricsRelease,
                 generator: torch.Generator) -> dict[str, float | None]:
    """The per-class Dice as it may leave: noised and clipped to [0, 1], or withheld (all None)."""
    if release.dice == "exact":
        return dict(dice)
    if release.dice != "noised":
        return {k: None for k in dice}
    out: dict[str, float | None] = {}
    for name in sorted(dice):  # a fixed order: the noise draws do not depend on dict order
        value = dice[name]
        if value is None:  # a class this site does not annotate (published label names): nothing to hide
            out[name] = None
            continue
        noisy = float(value) + release.std * float(torch.randn((), generator=generator, dtype=torch.float64))
        out[name] = round(min(1.0, max(0.0, noisy)), 6)  # post-processing: no further cost
    return out
