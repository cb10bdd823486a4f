"""What the privacy layer tells people: receipts (to the scientist) and ledger views (to the owner).

Epsilon is never stated where no differential-privacy guarantee holds: such fields are None and
``dp`` is False, so no reader can mistake a heuristic (percentile sharing alone) for a bound.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Receipt(_Record):
    """The privacy receipt attached to one released update."""

    job_id: str
    dataset: str
    scientist: str
    mechanism: str = Field(description="the filter chain, e.g. 'gaussian_update+percentile', or 'none'")
    parameters: list[dict[str, Any]] = Field(description="each filter's parameters, in chain order")
    dp: bool = Field(description="whether this release is differentially private")
    epsilon: float | None = Field(description="epsilon of this release alone, at `delta`; None when dp is false")
    delta: float | None = None
    cumulative_epsilon: float | None = Field(
        description="epsilon of every release of this dataset to this scientist so far, at `delta`; "
                    "None when no bound holds (dp false now or earlier)")
    epsilon_prv: float | None = Field(None, description="this release alone by the tighter PRV accountant "
                                                        "(the smaller of PRV and RDP); None when dp is false")
    cumulative_epsilon_prv: float | None = Field(None, description="cumulative_epsilon by the PRV accountant")
    metrics: dict[str, str] = Field(default_factory=dict, description=(
        "how each reported metric left: 'noised' (Gaussian noise, accounted in epsilon), 'withheld', "
        "'not computed', or 'exact' (no budget applied: outside any epsilon)"))
    note: str

    @model_validator(mode="after")
    def _no_number_without_dp(self) -> Receipt:
        if not self.dp and any(x is not None for x in (self.epsilon, self.cumulative_epsilon, self.epsilon_prv,
                                                        self.cumulative_epsilon_prv)):
            raise ValueError("a release that is not differentially private states no epsilon")
        return self


LedgerState = Literal["reserved", "released", "cancelled"]


class LedgerEntry(_Record):
    """One job's spend. Reserved when the job is accepted, released before its update can leave."""

    job_id: str
    scientist: str
    dataset: str
    state: LedgerState
    reserved_at: str
    released_at: str | None = None
    mechanism: str
    parameters: list[dict[str, Any]]
    dp: bool
    epsilon: float | None = Field(description="this release alone, at `delta`; None when not DP")
    delta: float | None = None


class BudgetStatus(_Record):
    """An owner's (epsilon, delta) limit and where it stands. ``scientist`` None: everyone together."""

    dataset: str
    scientist: str | None = None
    epsilon: float
    delta: float
    set_at: str
    spent: float | None = Field(description="epsilon spent at this budget's delta; None: unbounded "
                                            "(something was released without DP)")
    remaining: float


class Refusal(_Record):
    at: str
    scientist: str
    dataset: str
    mechanism: str
    detail: str


class BudgetCheck(_Record):
    """One budget against a projected number of releases. Epsilons at the budget's delta; None: unbounded."""

    scientist: str | None = Field(description="None: the dataset-wide budget (everyone together)")
    epsilon: float
    delta: float
    spent: float | None
    projected: float | None = Field(description="what the releases would add")
    remaining: float
    fits: bool


class Estimate(_Record):
    """What ``releases`` more releases with a filter chain would cost a scientist on a dataset."""

    dataset: str
    scientist: str
    mechanism: str
    dp: bool
    releases: int
    epsilon_per_release: float | None = Field(description="one release alone, at the chain's delta; None if not DP")
    epsilon_per_release_prv: float | None = Field(None, description="the same by the tighter PRV accountant")
    epsilon_total: float | None = Field(None, description="all ``releases`` composed, at the chain's delta (RDP); "
                                                          "None if not DP")
    delta: float | None = None
    parameters: list[dict[str, Any]] = Field([], description="each filter's parameters; DP-SGD's with the "
                                                              "sample rate and steps this dataset and plan give")
    budgets: list[BudgetCheck]


class LedgerView(_Record):
    """The owner's view of the ledger."""

    budgets: list[BudgetStatus]
    entries: list[LedgerEntry]
    refusals: list[Refusal]
