"""The privacy filter chain a plan asks for (``Plan.privacy``), as a validated model.

``Plan.privacy`` is either one filter or a chain::

    {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}
    {"mechanism": "percentile", "fraction": 0.25}
    {"filters": [{"mechanism": "gaussian_update", ...}, {"mechanism": "percentile", "fraction": 0.25}]}
    {"mechanism": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5}
    {"filters": [{"mechanism": "dp_sgd", ...}, {"mechanism": "percentile", "fraction": 0.25}]}

A single filter is shorthand for a chain of one. Filters run in the order given; ``dp_sgd`` acts
during local training, so it must come first, before the filters on the finished update.

A chain adds noise at most once (one ``gaussian_update`` or one ``dp_sgd``, not both): the update
of a DP-SGD job is already differentially private, and noise added to it afterwards is
post-processing that costs accuracy without changing the bound the ledger can state (a second
noise layer could only be accounted as a second release, which overstates the cost).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .accountant import GaussianEvent
from .calibration import noise_for_target

#: Most augmented patches per patient a DP-SGD step may average (K; each is a forward/backward pass).
MAX_AUGMENTATION_MULTIPLICITY = 32

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
    distributed: bool = Field(False, description=(
        "distributed DP under secure aggregation: each node adds only its share of the noise, and the "
        "secure sum of at least threshold nodes carries all of it; refused without secure aggregation"))

    def event(self) -> GaussianEvent:
        """The release, for the accountant: one unsampled Gaussian step with sensitivity 2 * clip.

        With ``distributed`` the same event holds for what the aggregator sees, the secure sum: every
        node scales its share so that at least ``threshold`` weighted shares add up to the full noise
        of the largest weighted contribution (see :func:`.mechanisms.distributed_share`).
        """
        return GaussianEvent(noise_multiplier=self.noise_multiplier / UPDATE_SENSITIVITY_IN_CLIPS,
                             sample_rate=1.0, steps=1)


class Percentile(_Filter):
    """Keep the ``fraction`` of update entries with the largest magnitude, zero the rest. Not DP alone."""

    mechanism: Literal["percentile"]
    fraction: float = Field(gt=0, le=1, description="share of entries kept, e.g. 0.25")


@dataclass(frozen=True)
class TrainingContext:
    """What a DP-SGD job's cost depends on beyond its filter: the node's data and the plan's schedule.

    ``patients``: distinct patients in the dataset's train split (the unit of privacy).
    ``batch_size``, ``local_epochs``, ``steps_per_epoch``: the plan's fields of the same names.
    """

    patients: int
    batch_size: int
    local_epochs: int
    steps_per_epoch: int | None = None

    def __post_init__(self):
        if self.patients < 1:
            raise ValueError("DP-SGD needs at least one patient in the train split")

    @classmethod
    def of(cls, plan: Any, volumes: Iterable[Any]) -> TrainingContext:
        """From a plan and a dataset's volume records (``split``, ``case_id``, optional ``patient``)."""
        patients = {getattr(v, "patient", None) or v.case_id for v in volumes if v.split == "train"}
        return cls(len(patients), plan.batch_size, plan.local_epochs, plan.steps_per_epoch)


class DPSGD(_Filter):
    """Patient-level DP-SGD in local training: per-patient gradient clipping + Gaussian noise.

    The unit of privacy is the patient. Each optimiser step Poisson-samples the train split's
    patients, each independently with probability ``q`` (``sample_rate``, or ``batch_size /
    patients`` when not given), and each sampled patient contributes ``augmentation_multiplicity``
    (K) random patches of one of its volumes, whose gradients are averaged into that patient's one
    gradient (De et al. 2022), so a per-sample gradient is a per-patient gradient whatever K is.
    Each is clipped to L2 norm ``max_grad_norm``; N(0, (sigma * max_grad_norm)^2) is added to
    their sum. The job is ``steps`` = ``local_epochs * (steps_per_epoch or ceil(1 / q))`` such
    steps: one accountant event (sigma, q, steps), the sampled Gaussian of Abadi et al. 2016.

    sigma is ``noise_multiplier`` as given, or derived from the privacy target: with
    ``target_epsilon`` and ``rounds`` (the train releases the target covers, e.g. an experiment's
    rounds), sigma is the smallest multiplier whose RDP epsilon over ``rounds`` jobs' steps is at
    most ``target_epsilon`` at ``delta`` (:func:`.calibration.noise_for_target`). The node derives
    it itself from its own patients and the plan's schedule; it never takes the scientist's figure.
    """

    mechanism: Literal["dp_sgd"]
    noise_multiplier: float | None = Field(None, gt=0, description="noise std divided by max_grad_norm "
                                           "(unitless); None: derived from target_epsilon")
    target_epsilon: float | None = Field(None, gt=0, le=100, description="epsilon the planned rounds may spend "
                                         "together (DP-SGD updates only; noised metrics are accounted on top)")
    rounds: int | None = Field(None, ge=1, le=10_000, description="train releases target_epsilon covers")
    max_grad_norm: float = Field(gt=0, description="L2 bound of one patient's gradient per step")
    delta: float = Field(gt=0, lt=1, description="the delta the receipt's epsilon is stated at")
    sample_rate: float | None = Field(None, gt=0, le=1, description="Poisson rate q per step; "
                                      "None: plan batch_size / patients (capped at 1)")
    augmentation_multiplicity: int = Field(1, ge=1, le=MAX_AUGMENTATION_MULTIPLICITY, description=(
        "K: augmented patches per sampled patient, averaged before clipping (accounting unchanged)"))

    @model_validator(mode="after")
    def _noise_or_target(self) -> DPSGD:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier or target_epsilon (the node derives the noise "
                             "multiplier from target_epsilon, delta and the rounds planned)")
        if (self.target_epsilon is None) != (self.rounds is None):
            raise ValueError("target_epsilon needs rounds (the train releases it covers), and rounds only "
                             "goes with target_epsilon")
        return self

    def schedule(self, ctx: TrainingContext) -> tuple[float, int]:
        """(q, steps) of one job with this filter in ``ctx``; the trainer runs exactly this."""
        q = self.sample_rate if self.sample_rate is not None else min(1.0, ctx.batch_size / ctx.patients)
        per_epoch = ctx.steps_per_epoch or math.ceil(1 / q)
        return q, ctx.local_epochs * per_epoch

    def sigma(self, ctx: TrainingContext) -> float:
        """The noise multiplier a job in ``ctx`` runs with (given, or derived from the target)."""
        key = self.derivation(ctx)
        return self.noise_multiplier if key is None else noise_for_target(*key)

    def derivation(self, ctx: TrainingContext) -> tuple[float, float, float, int] | None:
        """The (target, delta, q, steps) :func:`.calibration.noise_for_target` answers for a job in ``ctx``;
        None when the plan gives the noise multiplier."""
        if self.noise_multiplier is not None:
            return None
        q, steps = self.schedule(ctx)
        return self.target_epsilon, self.delta, q, steps * self.rounds

    def event(self, ctx: TrainingContext) -> GaussianEvent:
        """Sensitivity is max_grad_norm (add/remove one patient), so the multiplier is used as is."""
        q, steps = self.schedule(ctx)
        return GaussianEvent(noise_multiplier=self.sigma(ctx), sample_rate=q, steps=steps)


Filter = Annotated[GaussianUpdate | Percentile | DPSGD, Field(discriminator="mechanism")]
MECHANISMS = ("gaussian_update", "percentile", "dp_sgd")
NOISE = (GaussianUpdate, DPSGD)


class PrivacySpec(_Filter):
    filters: list[Filter] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_gaussian(self) -> PrivacySpec:
        # One noise calibration per release: two would be accounted twice for one output.
        if sum(isinstance(f, NOISE) for f in self.filters) > 1:
            raise ValueError("at most one noise filter ('gaussian_update' or 'dp_sgd') per chain: a DP-SGD "
                             "update is already differentially private, further noise only costs accuracy")
        if any(isinstance(f, DPSGD) for f in self.filters[1:]):
            raise ValueError("'dp_sgd' acts during local training, before any filter on the update: put it first")
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
    def dp_sgd(self) -> DPSGD | None:
        return next((f for f in self.filters if isinstance(f, DPSGD)), None)

    @property
    def noise(self) -> GaussianUpdate | DPSGD | None:
        """The chain's one noise filter, if any."""
        return next((f for f in self.filters if isinstance(f, NOISE)), None)

    @property
    def dp(self) -> bool:
        """Whether the chain is differentially private (it is iff it adds Gaussian noise)."""
        return self.noise is not None

    def noise_multiplier(self, context: TrainingContext | None = None) -> float | None:
        """The chain's noise multiplier (None if not DP); a DP-SGD target needs ``context`` to derive it."""
        if self.dp_sgd is not None:
            if self.dp_sgd.noise_multiplier is None and context is None:
                raise ValueError("a 'dp_sgd' target_epsilon is met by a noise multiplier that depends on the dataset "
                                 "and the plan: pass a TrainingContext")
            return self.dp_sgd.sigma(context) if context is not None else self.dp_sgd.noise_multiplier
        return self.gaussian.noise_multiplier if self.gaussian else None

    @property
    def delta(self) -> float | None:
        """The delta epsilons of this chain are stated at (None if not DP)."""
        return self.noise.delta if self.noise else None

    @property
    def name(self) -> str:
        """The chain as one word, e.g. ``"gaussian_update+percentile"``."""
        return "+".join(f.mechanism for f in self.filters)

    def events(self, context: TrainingContext | None = None) -> list[GaussianEvent]:
        """The accountant events of one release. DP-SGD's depend on ``context`` (required then)."""
        if self.dp_sgd is not None:
            if context is None:
                raise ValueError("a 'dp_sgd' chain's cost depends on the dataset and the plan: pass a TrainingContext")
            return [self.dp_sgd.event(context)]
        return [self.gaussian.event()] if self.gaussian else []

    def parameters(self, context: TrainingContext | None = None) -> list[dict]:
        """Each filter's parameters for receipts, with DP-SGD's derived rate and steps when known."""
        out = [f.model_dump() for f in self.filters]
        if self.dp_sgd is not None and context is not None:
            q, steps = self.dp_sgd.schedule(context)
            out[0] = {**out[0], "sample_rate": q, "steps": steps, "patients": context.patients,
                      "unit": "patient", "noise_multiplier": self.dp_sgd.sigma(context)}
        return out


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
