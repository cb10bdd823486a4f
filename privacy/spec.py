"""The privacy filter chain a plan asks for (``Plan.privacy``), as a validated model.

``Plan.privacy`` is either one filter or a chain::

    {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}
    {"mechanism": "percentile", "fraction": 0.25}
    {"filters": [{"mechanism": "gaussian_update", ...}, {"mechanism": "percentile", "fraction": 0.25}]}

A single filter is shorthand for a chain of one. Filters run in the order given.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .accountant import GaussianEvent

#: Two updates clipped to L2 norm C differ by at most 2C whatever one patient changes (added,
#: removed or replaced), so the L2 sensitivity of a clipped update is 2C, not C.
UPDATE_SENSITIVITY_IN_CLIPS = 2.0


class PrivacySpecError(ValueError):
    """A privacy spec that is not acceptable; the message names the field (``plan.privacy...``)."""


class _Filter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GaussianUpdate(_Filter):
    """Clip the update's global L2 norm to ``clip`` and add N(0, (noise_multiplier * clip)^2) to every entry."""

    mechanism: Literal["gaussian_update"]
    clip: float = Field(gt=0, description="L2 norm bound of the whole update, in weight units")
    noise_multiplier: float = Field(gt=0, description="noise std divided by clip (unitless)")
    delta: float = Field(gt=0, lt=1, description="the delta the receipt's epsilon is stated at")

    def event(self) -> GaussianEvent:
        """The release, for the accountant: one unsampled Gaussian step with sensitivity 2 * clip."""
        return GaussianEvent(noise_multiplier=self.noise_multiplier / UPDATE_SENSITIVITY_IN_CLIPS,
                             sample_rate=1.0, steps=1)


class Percentile(_Filter):
    """Keep the ``fraction`` of update entries with the largest magnitude, zero the rest. Not DP alone."""

    mechanism: Literal["percentile"]
    fraction: float = Field(gt=0, le=1, description="share of entries kept, e.g. 0.25")


Filter = Annotated[GaussianUpdate | Percentile, Field(discriminator="mechanism")]
MECHANISMS = ("gaussian_update", "percentile")


class PrivacySpec(_Filter):
    filters: list[Filter] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_gaussian(self) -> PrivacySpec:
        # One noise calibration per release: two would be accounted twice for one output.
        if sum(isinstance(f, GaussianUpdate) for f in self.filters) > 1:
            raise ValueError("at most one 'gaussian_update' filter per chain")
        return self

    @classmethod
    def parse(cls, obj: Any) -> PrivacySpec | None:
        """``Plan.privacy`` -> spec (None for no filters); raises PrivacySpecError naming the bad field."""
        if obj is None:
            return None
        shorthand = isinstance(obj, dict) and "mechanism" in obj
        try:
            return cls.model_validate({"filters": [obj]} if shorthand else obj)
        except ValidationError as exc:
            raise PrivacySpecError("\n".join(_describe(e, shorthand) for e in exc.errors())) from None

    @property
    def gaussian(self) -> GaussianUpdate | None:
        return next((f for f in self.filters if isinstance(f, GaussianUpdate)), None)

    @property
    def dp(self) -> bool:
        """Whether the chain is differentially private (it is iff it adds Gaussian noise)."""
        return self.gaussian is not None

    @property
    def name(self) -> str:
        """The chain as one word, e.g. ``"gaussian_update+percentile"``."""
        return "+".join(f.mechanism for f in self.filters)

    def events(self) -> list[GaussianEvent]:
        return [self.gaussian.event()] if self.gaussian else []


def _describe(err: dict, shorthand: bool) -> str:
    path, loc = "plan.privacy", err["loc"]
    if shorthand and loc[:2] == ("filters", 0):  # name the field as the plan spelled it
        loc = loc[2:]
    for part in loc:
        if part in MECHANISMS:  # pydantic's union tag, not a field
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        ctx = err.get("ctx", {})
        got = f"unknown mechanism {ctx['tag']!r}" if "tag" in ctx else "missing"
        return f"{path}.mechanism: {got}; known mechanisms: {', '.join(MECHANISMS)}"
    line = f"{path}: {err['msg']}"
    if err["type"] != "missing" and isinstance(err.get("input"), (str, int, float, bool)):
        line += f" (got {err['input']!r})"
    return line
