"""The privacy ledger: a durable SQLite record of every release and the budgets that bound them.

A job's spend is *reserved* atomically with the budget check when the job is accepted (so two
concurrent jobs cannot both squeeze under the limit), *released* (committed with
``synchronous=FULL``) before its update may leave the node, or *cancelled* if the job failed
before anything left. Reserved and released entries both count as spent.

Cumulative spend composes the releases' Gaussian events with the RDP accountant at the budget's
delta; a release without DP makes the spend of its scope unbounded (``math.inf``). Budgets are
enforced with RDP; receipts also state the tighter PRV figure (see :mod:`.accountant`).

A DP-SGD job's events depend on the dataset (patients in the train split) and the plan (batch
size, epochs, steps): the node passes them as a :class:`~.spec.TrainingContext` (``context``).
On a budgeted dataset the job's metrics are releases too (:class:`~.metrics.MetricsRelease`,
``metrics``): a noised Dice adds its event to the job's entry, and an evaluate job, which releases
no update, has an entry of its own.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .accountant import AccountingError, GaussianEvent, epsilon, tighter_epsilon
from .metrics import MetricsRelease
from .records import BudgetCheck, BudgetStatus, Estimate, LedgerEntry, LedgerView, Receipt, Refusal
from .spec import PrivacySpec, TrainingContext

SCHEMA = """
CREATE TABLE IF NOT EXISTS privacy_ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    scientist TEXT NOT NULL,
    dataset TEXT NOT NULL,
    state TEXT NOT NULL,
    reserved_at TEXT NOT NULL,
    released_at TEXT,
    mechanism TEXT NOT NULL,
    parameters TEXT NOT NULL,
    events TEXT NOT NULL,
    dp INTEGER NOT NULL,
    epsilon REAL,
    delta REAL,
    receipt TEXT
);
CREATE INDEX IF NOT EXISTS privacy_ledger_scope ON privacy_ledger(dataset, scientist);
CREATE TABLE IF NOT EXISTS privacy_budgets (
    dataset TEXT NOT NULL,
    scientist TEXT NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    set_at TEXT NOT NULL,
    PRIMARY KEY (dataset, scientist)
);
CREATE TABLE IF NOT EXISTS privacy_refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    scientist TEXT NOT NULL,
    dataset TEXT NOT NULL,
    mechanism TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

EVERYONE = "*"  # the scientist column of a dataset-wide budget


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fmt_epsilon(x: float) -> str:
    """Epsilon for people: 4 significant digits, or 'unbounded' (never 'inf')."""
    return "unbounded" if math.isinf(x) else f"{x:.4g}"


class BudgetExceeded(Exception):
    """A job whose projected spend exceeds a budget. Epsilons at the budget's delta; inf = unbounded."""

    def __init__(self, message: str, *, spent: float, projected: float, remaining: float):
        super().__init__(message)
        self.spent, self.projected, self.remaining = spent, projected, remaining


class LedgerError(LookupError):
    """No usable ledger entry for a job (never reserved, or cancelled)."""


#: The largest epsilon one release may state: past it no guarantee means anything (a noise
#: multiplier of 0.001 states 550,000), so such a plan is refused as invalid rather than run.
MAX_RELEASE_EPSILON = 1000.0


def release_epsilon(events: list[GaussianEvent], delta: float) -> float:
    """Epsilon of one release's events; AccountingError past :data:`MAX_RELEASE_EPSILON` or where none holds."""
    eps = epsilon(events, delta)
    if eps > MAX_RELEASE_EPSILON:
        z = min(e.noise_multiplier for e in events)
        raise AccountingError(f"one release would cost epsilon {eps:.4g} (noise multiplier {z:g}), over the "
                              f"{MAX_RELEASE_EPSILON:g} past which no guarantee means anything: add more noise")
    return eps


def repeated(events: list[GaussianEvent], times: int) -> list[GaussianEvent]:
    """The events of ``times`` identical releases (each event's steps multiplied)."""
    return [GaussianEvent(e.noise_multiplier, e.sample_rate, e.steps * times) for e in events]


@dataclass(frozen=True)
class Terms:
    """What one job releases, for the ledger: its update's filter chain and its metrics, together."""

    mechanism: str
    parameters: list[dict]
    events: list[GaussianEvent]
    dp: bool
    delta: float | None

    @classmethod
    def of(cls, spec: PrivacySpec | None, context: TrainingContext | None = None,
           metrics: MetricsRelease | None = None) -> Terms:
        """``spec``: the update's chain (None: no update leaves, or no filter); ``metrics``: on a budgeted dataset."""
        names = [spec.name] if spec else []
        params = spec.parameters(context) if spec else []
        events = spec.events(context) if spec else []  # a bad context raises here, before any transaction
        dp, delta = bool(spec and spec.dp), spec.delta if spec and spec.dp else None
        if metrics is not None:
            if metrics.dice == "noised" or not names:
                names.append(metrics.mechanism)
            params = [*params, metrics.model_dump()]
            events = [*events, *metrics.events()]
            # A noised Dice is DP on its own; beside an update it is DP only if the update is.
            dp = dp if spec else metrics.dice == "noised"
            delta = delta or (metrics.delta if dp else None)
        return cls("+".join(names) or "none", params, events, dp, delta)


@dataclass(frozen=True)
class Check:
    """One budget against one job: epsilons at the budget's delta (inf: unbounded)."""

    budget: BudgetStatus
    spent: float
    projected: float  # what the job adds
    remaining: float

    @property
    def ok(self) -> bool:
        return self.spent + self.projected <= self.budget.epsilon

    def message(self, job_mechanism: str) -> str:
        who = f"scientist {self.budget.scientist!r}" if self.budget.scientist else "all scientists together"
        why = ""
        if math.isinf(self.projected) and not math.isinf(self.spent):
            why = f" (filter chain {job_mechanism!r} is not differentially private)"
        elif math.isinf(self.spent):
            why = " (an earlier release of this dataset was not differentially private)"
        return (f"privacy budget exceeded for dataset {self.budget.dataset!r}, {who}: budget epsilon="
                f"{fmt_epsilon(self.budget.epsilon)} at delta={self.budget.delta:g}; spent so far epsilon="
                f"{fmt_epsilon(self.spent)}, this job's projected cost epsilon={fmt_epsilon(self.projected)}"
                f"{why}, remaining epsilon={fmt_epsilon(self.remaining)}; the job is refused")


class Ledger:
    """The ledger in a SQLite file (or an open connection in autocommit mode, ``isolation_level=None``)."""

    def __init__(self, db: str | Path | sqlite3.Connection):
        self._lock = threading.RLock()
        self._owns = not isinstance(db, sqlite3.Connection)
        if self._owns:
            db = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None)
        elif db.isolation_level is not None:
            raise ValueError("the ledger needs a connection in autocommit mode (isolation_level=None)")
        self._conn = db
        self._conn.row_factory = sqlite3.Row
        # Durability is the point of a ledger: a committed entry survives a crash or power loss.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        with self._lock:
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        if self._owns:
            with self._lock:
                self._conn.close()

    @contextmanager
    def _transaction(self):
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")  # takes the write lock now: check-then-insert is atomic
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # budgets -----------------------------------------------------------------------------------
    def set_budget(self, dataset: str, epsilon: float, delta: float, scientist: str | None = None) -> None:
        """The owner's limit for ``dataset``: for one ``scientist``, or (None) for everyone together."""
        if not (epsilon >= 0 and math.isfinite(epsilon)):
            raise ValueError(f"budget epsilon must be a finite number >= 0, got {epsilon}")
        if not 0 < delta < 1:
            raise ValueError(f"budget delta must be in (0, 1), got {delta}")
        with self._transaction() as c:
            c.execute("INSERT OR REPLACE INTO privacy_budgets VALUES (?,?,?,?,?)",
                      (dataset, scientist or EVERYONE, float(epsilon), float(delta), _now()))

    def budgets(self, dataset: str | None = None) -> list[BudgetStatus]:
        rows = self._query("SELECT * FROM privacy_budgets WHERE ? IS NULL OR dataset=? ORDER BY dataset, scientist",
                           (dataset, dataset))
        out = []
        for r in rows:
            scientist = None if r["scientist"] == EVERYONE else r["scientist"]
            spent = self.spent(r["dataset"], scientist, r["delta"])
            out.append(BudgetStatus(dataset=r["dataset"], scientist=scientist, epsilon=r["epsilon"],
                                    delta=r["delta"], set_at=r["set_at"],
                                    spent=None if math.isinf(spent) else spent,
                                    remaining=max(0.0, r["epsilon"] - spent)))
        return out

    def _applicable(self, dataset: str, scientist: str | None) -> list[BudgetStatus]:
        return [b for b in self.budgets(dataset) if b.scientist is None or b.scientist == scientist]

    # spend -------------------------------------------------------------------------------------
    def _scope(self, dataset: str, scientist: str | None,
               up_to_id: int | None = None) -> tuple[list[GaussianEvent], bool]:
        """(events, all_dp) of the non-cancelled entries of a dataset (and scientist)."""
        rows = self._query(
            "SELECT events, dp FROM privacy_ledger WHERE dataset=? AND (? IS NULL OR scientist=?) "
            "AND state!='cancelled' AND (? IS NULL OR id<=?)", (dataset, scientist, scientist, up_to_id, up_to_id))
        events = [GaussianEvent(*e) for r in rows for e in json.loads(r["events"])]
        return events, all(r["dp"] for r in rows)

    def spent(self, dataset: str, scientist: str | None = None, delta: float = 1e-5) -> float:
        """Epsilon spent on ``dataset`` (by ``scientist``, or everyone) at ``delta``; inf if unbounded."""
        events, all_dp = self._scope(dataset, scientist)
        return epsilon(events, delta) if all_dp else math.inf

    def spent_tighter(self, dataset: str, scientist: str | None = None, delta: float = 1e-5) -> float:
        """:meth:`spent` by the tighter of the PRV and RDP accountants (reports; budgets use RDP)."""
        events, all_dp = self._scope(dataset, scientist)
        return tighter_epsilon(events, delta) if all_dp else math.inf

    def remaining(self, dataset: str, scientist: str | None = None) -> float | None:
        """Epsilon left under the tightest budget that applies (None: no budget applies)."""
        return min((b.remaining for b in self._applicable(dataset, scientist)), default=None)

    def applies(self, dataset: str, scientist: str) -> bool:
        """Whether any budget bounds what ``scientist`` learns about ``dataset`` (then its metrics are releases)."""
        return bool(self._applicable(dataset, scientist))

    def project(self, dataset: str, scientist: str | None, spec: PrivacySpec | None | Terms,
                releases: int = 1, context: TrainingContext | None = None) -> list[Check]:
        """The cost of ``releases`` jobs with ``spec`` against every budget that applies to (dataset, scientist)."""
        terms = spec if isinstance(spec, Terms) else Terms.of(spec, context)
        checks = []
        new = terms.events * releases
        for b in self._applicable(dataset, scientist):
            events, all_dp = self._scope(dataset, b.scientist)
            spent = epsilon(events, b.delta) if all_dp else math.inf
            if not terms.dp:
                projected = math.inf
            elif math.isinf(spent):
                projected = epsilon(new, b.delta)
            else:
                projected = max(0.0, epsilon(events + new, b.delta) - spent)
            checks.append(Check(b, spent, projected, max(0.0, b.epsilon - spent)))
        return checks

    def estimate(self, dataset: str, scientist: str, spec: PrivacySpec | None, releases: int = 1,
                 context: TrainingContext | None = None, metrics: MetricsRelease | None = None) -> Estimate:
        """What ``releases`` more jobs with ``spec`` would cost, and whether each applicable budget allows it."""
        if releases < 1:
            raise ValueError(f"releases must be >= 1, got {releases}")
        terms = Terms.of(spec, context, metrics)
        dp = terms.dp

        def finite(x: float) -> float | None:
            return None if math.isinf(x) else x

        checks = [BudgetCheck(scientist=c.budget.scientist, epsilon=c.budget.epsilon, delta=c.budget.delta,
                              spent=finite(c.spent), projected=finite(c.projected), remaining=c.remaining, fits=c.ok)
                  for c in self.project(dataset, scientist, terms, releases)]
        return Estimate(dataset=dataset, scientist=scientist, mechanism=terms.mechanism, dp=dp,
                        releases=releases, delta=terms.delta, budgets=checks,
                        epsilon_per_release=release_epsilon(terms.events, terms.delta) if dp else None,
                        epsilon_per_release_prv=tighter_epsilon(terms.events, terms.delta) if dp else None,
                        epsilon_total=epsilon(repeated(terms.events, releases), terms.delta) if dp else None,
                        parameters=terms.parameters)

    # entries -----------------------------------------------------------------------------------
    def reserve(self, job_id: str, scientist: str, dataset: str, spec: PrivacySpec | None,
                context: TrainingContext | None = None, metrics: MetricsRelease | None = None) -> LedgerEntry:
        """Check every applicable budget and record the job's spend, atomically; raises BudgetExceeded.

        ``context``: the dataset and plan figures a DP-SGD chain's cost depends on (required then).
        ``metrics``: how the job's metrics leave, when they are releases (a budgeted dataset).
        """
        terms = Terms.of(spec, context, metrics)
        mechanism = terms.mechanism
        eps = release_epsilon(terms.events, terms.delta) if terms.dp else None  # may refuse: before the transaction
        with self._transaction() as c:
            failed = [ch for ch in self.project(dataset, scientist, terms) if not ch.ok]
            if not failed:
                c.execute("INSERT INTO privacy_ledger(job_id, scientist, dataset, state, reserved_at, mechanism, "
                          "parameters, events, dp, epsilon, delta) VALUES (?,?,?,'reserved',?,?,?,?,?,?,?)",
                          (job_id, scientist, dataset, _now(), mechanism, json.dumps(terms.parameters),
                           json.dumps([[e.noise_multiplier, e.sample_rate, e.steps] for e in terms.events]),
                           int(terms.dp), eps, terms.delta))
        if failed:
            worst = max(failed, key=lambda ch: ch.spent + ch.projected - ch.budget.epsilon)
            message = worst.message(mechanism)
            with self._transaction() as c:  # outside the check: a refusal must be recorded, not rolled back
                c.execute("INSERT INTO privacy_refusals(at, scientist, dataset, mechanism, detail) VALUES (?,?,?,?,?)",
                          (_now(), scientist, dataset, mechanism, message))
            raise BudgetExceeded(message, spent=worst.spent, projected=worst.projected, remaining=worst.remaining)
        return self.entry(job_id)

    def release(self, job_id: str) -> Receipt:
        """Mark the job's spend released (durably) and return its receipt. Call BEFORE the update leaves."""
        row = self._row(job_id)
        if row is None or row["state"] == "cancelled":
            raise LedgerError(f"job {job_id} has no reserved privacy spend in the ledger")
        if row["state"] == "released":
            return Receipt.model_validate_json(row["receipt"])
        receipt = self._receipt(row)
        with self._transaction() as c:
            c.execute("UPDATE privacy_ledger SET state='released', released_at=?, receipt=? WHERE job_id=?",
                      (_now(), receipt.model_dump_json(), job_id))
        return receipt

    def cancel(self, job_id: str) -> None:
        """Give back a reservation whose job failed before anything was released (no-op otherwise)."""
        with self._transaction() as c:
            c.execute("UPDATE privacy_ledger SET state='cancelled' WHERE job_id=? AND state='reserved'", (job_id,))

    def entry(self, job_id: str) -> LedgerEntry | None:
        row = self._row(job_id)
        return self._entry(row) if row else None

    def receipt(self, job_id: str) -> Receipt | None:
        """The receipt of a released job, else None."""
        row = self._row(job_id)
        return Receipt.model_validate_json(row["receipt"]) if row and row["receipt"] else None

    def entries(self, dataset: str | None = None, scientist: str | None = None,
                states: tuple[str, ...] | None = None) -> list[LedgerEntry]:
        rows = self._query("SELECT * FROM privacy_ledger WHERE (? IS NULL OR dataset=?) AND (? IS NULL OR scientist=?) "
                           "ORDER BY id", (dataset, dataset, scientist, scientist))
        return [self._entry(r) for r in rows if states is None or r["state"] in states]

    def history(self, dataset: str, scientist: str | None, delta: float) -> list[tuple[LedgerEntry, float]]:
        """Released entries of a scope in order, each with the scope's cumulative epsilon after it (inf: unbounded)."""
        rows = self._query("SELECT * FROM privacy_ledger WHERE dataset=? AND (? IS NULL OR scientist=?) "
                           "AND state='released' ORDER BY id", (dataset, scientist, scientist))
        out, events, bounded = [], [], True
        for r in rows:
            events += [GaussianEvent(*e) for e in json.loads(r["events"])]
            bounded = bounded and bool(r["dp"])
            out.append((self._entry(r), epsilon(events, delta) if bounded else math.inf))
        return out

    def refusals(self) -> list[Refusal]:
        return [Refusal(**{k: r[k] for k in ("at", "scientist", "dataset", "mechanism", "detail")})
                for r in self._query("SELECT * FROM privacy_refusals ORDER BY id")]

    def view(self) -> LedgerView:
        return LedgerView(budgets=self.budgets(), entries=self.entries(), refusals=self.refusals())

    def _row(self, job_id: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM privacy_ledger WHERE job_id=?", (job_id,))
        return rows[0] if rows else None

    @staticmethod
    def _entry(r: sqlite3.Row) -> LedgerEntry:
        return LedgerEntry(job_id=r["job_id"], scientist=r["scientist"], dataset=r["dataset"], state=r["state"],
                           reserved_at=r["reserved_at"], released_at=r["released_at"], mechanism=r["mechanism"],
                           parameters=json.loads(r["parameters"]), dp=bool(r["dp"]), epsilon=r["epsilon"],
                           delta=r["delta"])

    def _receipt(self, r: sqlite3.Row) -> Receipt:
        """The receipt of an entry; an entry without metrics terms had no budget when it was made."""
        params = json.loads(r["parameters"])
        release = MetricsRelease.in_parameters(params)
        base = dict(job_id=r["job_id"], dataset=r["dataset"], scientist=r["scientist"], mechanism=r["mechanism"],
                    parameters=params, metrics=_metrics_handling(release, bool(r["dp"])))
        if not r["dp"]:
            why = ("no privacy filter was applied" if r["mechanism"] == "none" else
                   f"filter chain {r['mechanism']!r} adds no calibrated noise (percentile sharing alone is a "
                   "heuristic, not DP)")
            return Receipt(**base, dp=False, epsilon=None, delta=None, cumulative_epsilon=None,
                           note=f"NOT differentially private: {why}. No epsilon is stated because none holds."
                                + _metrics_note(release))
        events, all_dp = self._scope(r["dataset"], r["scientist"], up_to_id=r["id"])
        cumulative = epsilon(events, r["delta"]) if all_dp else None
        own = [GaussianEvent(*e) for e in json.loads(r["events"])]
        if r["mechanism"].startswith("dp_sgd"):
            p = params[0]
            note = (f"Patient-level DP-SGD in local training (Opacus): each of {p.get('steps')} steps Poisson-samples "
                    f"patients at rate {p.get('sample_rate', 0):.4g}, clips each patient's gradient to L2 norm "
                    f"{p['max_grad_norm']:g} and adds Gaussian noise (multiplier {p['noise_multiplier']:g}); the "
                    "unit of privacy is the patient (all of a patient's volumes together).")
        elif r["mechanism"].startswith("gaussian_update"):
            note = ("Gaussian mechanism on the update clipped to L2 norm `clip` (sensitivity 2*clip: one patient "
                    "added, removed or replaced).")
        else:
            note = "No update left the node: this release is the job's metrics alone."
        note += _metrics_note(release)
        note += (" epsilon: Opacus's RDP accountant (budgets use it); epsilon_prv: the tighter PRV accountant. "
                 "Cumulative: every release of this dataset to this scientist so far, at the same delta.")
        if cumulative is None:
            note += (" No cumulative bound holds: an earlier release of this dataset to this scientist was not "
                     "differentially private.")
        return Receipt(**base, dp=True, epsilon=r["epsilon"], delta=r["delta"], cumulative_epsilon=cumulative,
                       epsilon_prv=tighter_epsilon(own, r["delta"]),
                       cumulative_epsilon_prv=tighter_epsilon(events, r["delta"]) if all_dp else None, note=note)


def _metrics_handling(release: MetricsRelease | None, dp: bool) -> dict[str, str]:
    if release is None:  # no budget applied: reported as computed, outside any epsilon (a DP job's loss aside)
        return {"dice": "exact", "loss": "withheld" if dp else "exact"}
    return {"dice": release.dice, "loss": release.loss}


def _metrics_note(release: MetricsRelease | None) -> str:
    if release is None:
        return (" Metrics: no budget applied to this dataset and scientist, so the reported Dice is exact and "
                "outside any epsilon stated here (the training loss of a DP job is withheld).")
    how = {"noised": "released with Gaussian noise and accounted in this epsilon", "withheld": "withheld",
           "not computed": "not computed", "exact": "exact"}
    text = f" Metrics (the dataset has a budget, so every reported number is a release): Dice {how[release.dice]}"
    if release.dice == "noised":
        text += (f" (per-class mean over the {release.split} split, noise std {release.std:.4g} = multiplier "
                 f"{release.noise_multiplier:g} x L2 sensitivity {release.sensitivity:.4g}; clipped to [0, 1])")
    return text + f"; training loss {how[release.loss]}."
