"""What an experiment reports: per-round results (:class:`RoundResult`, :class:`SiteResult`) and the
tables and summaries built from them (history, Dice table, privacy receipts and estimates, results JSON).

:class:`~voxgrid.experiment.Experiment` exposes these as its methods; they are here so that the
experiment module holds only the round loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from voxgrid.wire import JobStatus

if TYPE_CHECKING:
    from voxgrid.experiment import Experiment
    from voxgrid.plan import Plan
    from voxgrid.pointers import DatasetPointer


@dataclass
class SiteResult:
    node: str
    dataset: str
    ok: bool
    error: str | None = None
    samples: int = 0
    loss: float | None = None
    val_dice: dict = field(default_factory=dict)
    test_dice: dict = field(default_factory=dict)
    compute_s: float = 0.0
    global_val_dice: dict = field(default_factory=dict)  # the new global model on the val split (select=True)
    privacy: dict | None = None  # the node's privacy receipt for this release (voxgrid.privacy.Receipt as JSON)
    test_dice_noise_sd: float | None = None  # std of the noise the node added to each test Dice (None: exact)

    @property
    def site(self) -> str:
        return f"{self.dataset}@{self.node}"

    @classmethod
    def from_status(cls, p: DatasetPointer, st: JobStatus | None, err: str | None) -> SiteResult:
        """A site's result from its train job's final status (None if it has none) and error."""
        m = st.metrics if st is not None and st.metrics else None
        return cls(node=p.node, dataset=p.name, ok=err is None, error=err, samples=m.samples if m else 0,
                   loss=m.loss if m else None, val_dice=dict(m.dice) if m else {},
                   compute_s=m.compute_s if m else 0.0,
                   privacy=st.privacy.model_dump(mode="json") if st is not None and st.privacy else None)


@dataclass
class RoundResult:
    round: int
    sites: list[SiteResult]
    wall_s: float
    compute_s: float  # the slowest node's local compute: the critical path of the round
    train_wall_s: float
    eval_wall_s: float = 0.0
    secure_s: dict = field(default_factory=dict)  # secure aggregation: seconds per step (voxgrid.secure)

    @property
    def overhead_s(self) -> float:
        """Everything but local training compute: scheduling, serialisation, transfer, aggregation."""
        return self.train_wall_s - self.compute_s

    @property
    def mean_test_dice(self) -> float:
        """Mean over the answering sites and their annotated classes of the global model's test Dice (NaN if none)."""
        return mean_dice([s.test_dice for s in self.sites if s.ok])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overhead_s"] = self.overhead_s
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RoundResult:
        """The inverse of :meth:`to_dict` (as a checkpoint stores it)."""
        d = dict(d)
        d.pop("overhead_s", None)
        d["sites"] = [SiteResult(**s) for s in d["sites"]]
        return cls(**d)


def mean_dice(dicts: list[dict]) -> float:
    vals = [v for d in dicts for v in d.values() if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


def history_frame(history: Sequence[RoundResult]):
    """One row per (round, site): loss, samples, compute time, Dice per class on the test split."""
    import pandas as pd

    rows = []
    for r in history:
        for s in r.sites:
            row = {"round": r.round, "site": s.site, "ok": s.ok, "samples": s.samples, "loss": s.loss,
                   "compute_s": round(s.compute_s, 3)}
            row.update({f"dice[{k}]": v for k, v in s.test_dice.items()})
            row["dice_noise_sd"] = s.test_dice_noise_sd
            rows.append(row)
    return pd.DataFrame(rows)


def dice_table(r: RoundResult, classes: Sequence[str]) -> str:
    """A plain-text table: one row per site, Dice per class of the global model on the test split."""
    head = f"{'site':<28}" + "".join(f"{c:>12}" for c in classes) + f"{'mean':>10}"
    lines = [f"round {r.round}: global model Dice on each site's test split", head, "-" * len(head)]
    for s in r.sites:
        vals = [s.test_dice.get(c) for c in classes]
        cells = "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in vals)
        known = [v for v in vals if v is not None]
        mean = f"{sum(known) / len(known):.3f}" if known else "-"
        lines.append(f"{s.site:<28}{cells}{mean:>10}" + ("" if s.ok else f"  (dropped: {s.error})"[:80]))
    lines += [noise_note(s.site, s.test_dice_noise_sd) for s in r.sites if s.test_dice_noise_sd]
    return "\n".join(lines)


def noise_note(site: str, sd: float) -> str:
    """The line under a Dice table for a site whose node noised the Dice it released."""
    return (f"note: Dice at {site} is noised by its node (privacy budget): Gaussian, std {sd:.3f} per class; "
            "differences within about 2 std are noise")


PRIVACY_COLUMNS = ["round", "site", "mechanism", "dp", "epsilon", "cumulative_epsilon", "delta", "note"]


def privacy_summary(history: Sequence[RoundResult]):
    """Every receipt the nodes sent with their updates: one row per (round, site)."""
    import pandas as pd

    rows = [{"round": r.round, "site": s.site, "mechanism": s.privacy.get("mechanism"), "dp": s.privacy.get("dp"),
             "epsilon": s.privacy.get("epsilon"), "cumulative_epsilon": s.privacy.get("cumulative_epsilon"),
             "delta": s.privacy.get("delta"), "note": s.privacy.get("note")}
            for r in history for s in r.sites if s.privacy]
    return pd.DataFrame(rows, columns=PRIVACY_COLUMNS)


def privacy_estimate(pointers: Sequence[DatasetPointer], plan: Plan, releases: int):
    """What ``releases`` more train jobs would cost at each node, asked of the nodes: a DataFrame,
    one row per site with mechanism, epsilon per release, the projected total and each budget's
    remaining epsilon."""
    import pandas as pd

    rows = []
    for p in pointers:
        est = p.client.privacy_estimate(p.name, plan.privacy, releases=max(releases, 1),
                                        plan=plan.model_dump(mode="json"))
        row = {"site": f"{p.name}@{p.node}", "mechanism": est.mechanism, "dp": est.dp,
               "releases": est.releases, "epsilon_per_release": est.epsilon_per_release,
               "epsilon_per_release_prv": est.epsilon_per_release_prv, "delta": est.delta,
               "parameters": est.parameters}
        for b in est.budgets:
            scope = "dataset" if b.scientist is None else "scientist"
            row.update({f"{scope} budget": b.epsilon, f"{scope} spent": b.spent,
                        f"{scope} projected": b.projected, f"{scope} remaining": b.remaining,
                        f"{scope} fits": b.fits})
        rows.append(row)
    return pd.DataFrame(rows)


def results(exp: Experiment) -> dict:
    """The experiment as JSON: plan, strategy, sites, secure-aggregation settings, every round."""
    return {"experiment_id": exp.experiment_id, "plan": exp.plan.model_dump(mode="json"),
            "plan_hash": exp.plan.content_hash, "strategy": exp.strategy.config(),
            "sites": [{"node": p.node, "url": p.url, "dataset": p.name} for p in exp.pointers],
            "secure_aggregation": exp.secure_aggregation, "threshold": exp.threshold,
            "secure_neighbours": exp.secure_neighbours,
            "rounds": [r.to_dict() for r in exp.history]}
