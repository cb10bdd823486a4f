"""The experiment: the scientist's federated loop over pointers.

Each round: send the global weights and the plan to every selected node, wait for their updates
(dropping nodes that fail or time out, as long as ``min_nodes`` answered), aggregate with the
strategy, score the new global model on each site's test split, checkpoint.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from voxgrid import tensors
from voxgrid.client import RequestRefused, VoxgridError
from voxgrid.plan import Plan, initial_weights
from voxgrid.pointers import DatasetPointer
from voxgrid.selection import ModelSelection, mean_score
from voxgrid.strategies import ClientUpdate, FedAvg, Strategy, StrategyState, from_config
from voxgrid.tensors import StateDict
from voxgrid.privacy import PrivacySpec
from voxgrid.secure import check_secure, round_config, secure_round
from voxgrid.wire import NAME_RE, JobRequest, JobStatus, SecureAggregation


class RoundFailed(VoxgridError):
    """Fewer than ``min_nodes`` nodes answered a round; the global model is unchanged."""


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

    @property
    def site(self) -> str:
        return f"{self.dataset}@{self.node}"


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
        return _mean_dice([s.test_dice for s in self.sites if s.ok])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overhead_s"] = self.overhead_s
        return d


def _timed_out(deadline: float) -> bool:
    return time.monotonic() > deadline


class Experiment:
    """A federated experiment.

    Args:
        plan: the training recipe sent to every node.
        pointers: the datasets to train on (from ``grid.search``), one job per pointer per round.
        strategy: the aggregation rule (default :class:`~voxgrid.strategies.FedAvg`).
        rounds: number of rounds :meth:`run` performs.
        min_nodes: fewest answering nodes for a round to count (default: all).
        job_timeout: seconds a node has to return its update before it is dropped from the round.
        evaluate: after each round, score the global model on every site's test split.
        checkpoint_dir: where a checkpoint per round is written; :meth:`resume` continues from it.
        select: keep the best global model and each site's best local model by validation Dice
            (``exp.selection``, :mod:`voxgrid.selection`); costs an evaluate job per site per round.
            With secure aggregation only the global model is kept: local updates are never seen.
        secure_aggregation: the nodes release their updates only masked and this notebook learns
            only their weighted sum (:mod:`voxgrid.secure`); needs a sum-based strategy (FedAvg,
            FedAvgDice, FedProx, FedBN, FedAdam, FedYogi) and one dataset per node.
        threshold: fewest nodes that must stay to the end of a secure round for the sum to be
            recovered (default: a majority, at least 2); more dropouts fail the round cleanly.
        secure_neighbours: SecAgg+ (Bell et al. 2020): each node masks with and shares its secrets
            among only this many others (an even number) instead of all, for large federations;
            the threshold then applies to each node's group. None: every pair (Bonawitz et al.).
    """

    def __init__(self, plan: Plan, pointers: list[DatasetPointer], *, strategy: Strategy | None = None,
                 rounds: int = 3, min_nodes: int | None = None, job_timeout: float = 600.0, evaluate: bool = True,
                 checkpoint_dir: str | Path | None = None, name: str | None = None, seed: int = 0,
                 initial: StateDict | None = None, select: bool = False, secure_aggregation: bool = False,
                 threshold: int | None = None, secure_neighbours: int | None = None):
        if not pointers:
            raise ValueError("an experiment needs at least one dataset pointer (grid.search returned none?)")
        self.strategy = strategy if strategy is not None else FedAvg()
        # Once, here: client-side options of the strategy (e.g. FedProx's mu) travel in the plan.
        self.plan = self.strategy.configure_plan(plan)
        self.pointers = list(pointers)
        self.rounds = rounds
        self.min_nodes = len(self.pointers) if min_nodes is None else min_nodes
        if not 1 <= self.min_nodes <= len(self.pointers):
            raise ValueError(f"min_nodes={min_nodes} must be between 1 and the {len(self.pointers)} pointers")
        spec = PrivacySpec.parse(self.plan.privacy)
        if spec is not None and spec.gaussian is not None and spec.gaussian.distributed and not secure_aggregation:
            raise ValueError("plan.privacy: a distributed 'gaussian_update' adds only a share of the noise at each "
                             "node, so it needs secure_aggregation=True")
        self.secure_aggregation = secure_aggregation
        self.secure_neighbours = secure_neighbours
        self.threshold = (check_secure(self.strategy, self.pointers, threshold, secure_neighbours)
                          if secure_aggregation else None)
        self.job_timeout = job_timeout
        self.evaluate = evaluate
        self.seed = seed
        name = name or "exp"
        self.experiment_id = f"{name}-{uuid.uuid4().hex[:8]}"
        if not NAME_RE.match(self.experiment_id):
            raise ValueError(f"invalid experiment name {name!r}: use letters, digits, '.', '_' or '-'")
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.global_weights: StateDict = initial if initial is not None else initial_weights(plan, seed=seed)
        self.history: list[RoundResult] = []
        self.select = select
        self.selection = ModelSelection(self.plan, self.experiment_id) if select else None
        # weights id last uploaded to each node URL: the weights scored after round r are the ones
        # round r + 1 trains from, so each node gets those bytes once, not twice.
        self._sent_weights: dict[str, str] = {}
        self._blob_cache: tuple[StateDict, bytes, str] | None = None

    # the loop ----------------------------------------------------------------------------------
    def run(self, rounds: int | None = None, progress: bool = True, on_round=None) -> list[RoundResult]:
        """Run rounds until ``rounds`` (default: the experiment's) have completed in total."""
        target = self.rounds if rounds is None else rounds
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=target, initial=len(self.history), desc=self.experiment_id, unit="round")
        try:
            while len(self.history) < target:
                result = self.run_round()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"mean test Dice {result.mean_test_dice:.3f}" if self.evaluate else "")
                if on_round:
                    on_round(self, result)
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def run_round(self) -> RoundResult:
        rnd = len(self.history)
        t0 = time.perf_counter()
        outcomes, secure_s = self._secure_round(rnd) if self.secure_aggregation else (self._plain_round(rnd), {})
        train_wall = time.perf_counter() - t0
        sites = []
        for p, (st, err) in zip(self.pointers, outcomes):
            m = st.metrics if st is not None and st.metrics else None
            sites.append(SiteResult(node=p.node, dataset=p.name, ok=err is None, error=err,
                                    samples=m.samples if m else 0, loss=m.loss if m else None,
                                    val_dice=dict(m.dice) if m else {}, compute_s=m.compute_s if m else 0.0,
                                    privacy=st.privacy.model_dump(mode="json") if st is not None and st.privacy
                                    else None))
        compute = max((s.compute_s for s in sites if s.ok), default=0.0)
        t1 = time.perf_counter()
        if self.evaluate:
            self._score(rnd, sites)
        if self.selection:
            self._select(rnd, sites)
        result = RoundResult(round=rnd, sites=sites, wall_s=time.perf_counter() - t0, compute_s=compute,
                             train_wall_s=train_wall, eval_wall_s=time.perf_counter() - t1,
                             secure_s=secure_s)
        self.history.append(result)
        if self.checkpoint_dir:
            self.save_checkpoint(self.checkpoint_dir)
        return result

    def _check_answered(self, rnd: int, outcomes: list, extra: str = "") -> None:
        answered = sum(err is None for _, err in outcomes)
        if answered < self.min_nodes or extra:
            reasons = "; ".join(f"{p.node}: {err}" for p, (_, err) in zip(self.pointers, outcomes) if err)
            raise RoundFailed(f"round {rnd}: only {answered} of {len(self.pointers)} nodes answered, "
                              f"min_nodes={self.min_nodes} ({reasons}){extra}")

    def _plain_round(self, rnd: int) -> list[tuple[JobStatus | None, str | None]]:
        """Every node's update is downloaded and the strategy aggregates them."""
        blob, wid = self._global_blob()
        with ThreadPoolExecutor(max_workers=len(self.pointers)) as pool:
            trained = list(pool.map(lambda p: self._train_one(p, rnd, blob, wid), self.pointers))
        outcomes = [(st, err) for st, _, err in trained]
        self._check_answered(rnd, outcomes)
        updates = [ClientUpdate(node=p.node, dataset=p.name, delta=delta, samples=st.metrics.samples,
                                metrics=st.metrics.model_dump())
                   for p, (st, delta, err) in zip(self.pointers, trained) if err is None]
        start, self.global_weights = self.global_weights, self.strategy.aggregate(self.global_weights, updates)
        if self.selection:
            self.selection.observe_local(rnd, start, updates)
        return outcomes

    def _secure_round(self, rnd: int) -> tuple[list[tuple[JobStatus | None, str | None]], dict[str, float]]:
        """Only the masked updates' weighted sum is recovered (:mod:`voxgrid.secure`); also returns
        the seconds each step took."""
        blob, wid = self._global_blob()
        weight = self.strategy.secure_weight
        config = round_config(self.experiment_id, rnd, self.pointers, weight, self.threshold, self.secure_neighbours)
        out = secure_round(config=config, weight=weight, pointers=self.pointers, like=self.global_weights,
                           submit=lambda p, secure: self._submit(p, self._job(p, rnd, wid, "train", secure=secure),
                                                                 blob),
                           wait=self._wait)
        self._check_answered(rnd, out.outcomes, extra=f"; {out.error}" if out.error else "")
        self.global_weights = self.strategy.apply_mean(self.global_weights, out.mean_delta)
        return out.outcomes, out.timings

    def _job(self, p: DatasetPointer, rnd: int, weights_id: str, kind: str, split: str = "val",
             secure: SecureAggregation | None = None) -> JobRequest:
        return JobRequest(kind=kind, experiment_id=self.experiment_id, round=rnd, dataset=p.name,
                          plan=self.plan.model_dump(mode="json"), plan_hash=self.plan.content_hash,
                          weights_id=weights_id, split=split, evaluate=(self.evaluate or self.select) and kind == "train",
                          seed=self.seed * 100003 + rnd, secure=secure)

    def _put_weights(self, p: DatasetPointer, blob: bytes, weights_id: str, force: bool = False) -> bool:
        """Upload ``blob`` unless this experiment already sent these weights to the node; True if uploaded."""
        if not force and self._sent_weights.get(p.url) == weights_id:
            return False
        ref = p.client.put_weights(blob)
        if ref.weights_id != weights_id:
            raise VoxgridError(f"node {p.node} stored the weights under {ref.weights_id}, expected {weights_id}")
        self._sent_weights[p.url] = weights_id
        return True

    def _await(self, p: DatasetPointer, req: JobRequest, blob: bytes) -> JobStatus:
        """Upload weights (if the node lacks them), submit, long-poll until the job ends or the timeout passes."""
        return self._wait(p, self._submit(p, req, blob))

    def _submit(self, p: DatasetPointer, req: JobRequest, blob: bytes) -> tuple[JobStatus, float]:
        """Submit (uploading the weights first if needed); returns the status and the job's deadline."""
        deadline = time.monotonic() + self.job_timeout
        uploaded = self._put_weights(p, blob, req.weights_id)
        try:
            st = p.client.submit(req)
        except RequestRefused:
            if uploaded:
                raise
            # The node no longer holds the weights sent earlier (e.g. a rebuilt home): send them again.
            self._put_weights(p, blob, req.weights_id, force=True)
            st = p.client.submit(req)
        return st, deadline

    def _wait(self, p: DatasetPointer, submitted: tuple[JobStatus, float]) -> JobStatus:
        st, deadline = submitted
        while st.state in ("queued", "running"):
            if _timed_out(deadline):
                raise TimeoutError(f"job {st.job_id} did not finish within {self.job_timeout:.0f} s")
            st = p.client.job(st.job_id, wait=min(30.0, max(0.1, deadline - time.monotonic())))
        if st.state == "failed":
            raise VoxgridError(f"job failed at the node: {st.error}")
        return st

    def _train_one(self, p: DatasetPointer, rnd: int, blob: bytes, weights_id: str):
        try:
            st = self._await(p, self._job(p, rnd, weights_id, "train"), blob)
            delta = tensors.loads(p.client.update(st.job_id))
            tensors.check_compatible(self.global_weights, delta)
            return st, delta, None
        except (VoxgridError, TimeoutError, ValueError, OSError) as exc:
            return None, None, f"{type(exc).__name__}: {exc}"

    def _global_blob(self) -> tuple[bytes, str]:
        """The global weights as safetensors and their digest, made once per weight set: scoring,
        checkpointing and the next round's upload all send the same bytes. The weights are always
        replaced (never changed in place), so the dict's identity says whether they changed."""
        if self._blob_cache is None or self._blob_cache[0] is not self.global_weights:
            blob = tensors.dumps(self.global_weights)
            self._blob_cache = (self.global_weights, blob, tensors.digest(blob))
        return self._blob_cache[1], self._blob_cache[2]

    def _score(self, rnd: int, sites: list[SiteResult], split: str = "test") -> None:
        blob, wid = self._global_blob()

        def one(p: DatasetPointer):
            try:
                st = self._await(p, self._job(p, rnd, wid, "evaluate", split=split), blob)
                return dict(st.metrics.dice)
            except (VoxgridError, TimeoutError, ValueError, OSError):
                return {}

        with ThreadPoolExecutor(max_workers=len(self.pointers)) as pool:
            for site, dice in zip(sites, pool.map(one, self.pointers)):
                setattr(site, "test_dice" if split == "test" else "global_val_dice", dice)

    def _select(self, rnd: int, sites: list[SiteResult]) -> None:
        """Score the new global model on every site's val split; keep it if it is the best so far."""
        if len(self.pointers) == 1 and type(self.strategy) is FedAvg:
            sites[0].global_val_dice = dict(sites[0].val_dice)  # one site: the global model is its local one
        else:
            self._score(rnd, sites, split="val")
        self.selection.observe_global(rnd, self.global_weights,
                                      {s.site: mean_score(s.global_val_dice) for s in sites if s.ok})

    # privacy ---------------------------------------------------------------------------------
    def privacy_estimate(self, rounds: int | None = None):
        """What the remaining rounds would cost at each node, asked of the nodes before anything runs.

        Returns a DataFrame: one row per site with mechanism, epsilon per release, the projected total
        and each budget's remaining epsilon (nodes refuse a job that would exceed a budget).
        """
        import pandas as pd

        releases = (self.rounds if rounds is None else rounds) - len(self.history)
        rows = []
        for p in self.pointers:
            est = p.client.privacy_estimate(p.name, self.plan.privacy, releases=max(releases, 1),
                                            plan=self.plan.model_dump(mode="json"))
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

    def privacy_summary(self):
        """Every receipt the nodes sent with their updates: one row per (round, site)."""
        import pandas as pd

        rows = [{"round": r.round, "site": s.site, "mechanism": s.privacy.get("mechanism"), "dp": s.privacy.get("dp"),
                 "epsilon": s.privacy.get("epsilon"), "cumulative_epsilon": s.privacy.get("cumulative_epsilon"),
                 "delta": s.privacy.get("delta"), "note": s.privacy.get("note")}
                for r in self.history for s in r.sites if s.privacy]
        return pd.DataFrame(rows, columns=["round", "site", "mechanism", "dp", "epsilon", "cumulative_epsilon",
                                           "delta", "note"])

    # reading results ---------------------------------------------------------------------------
    def history_frame(self):
        """One row per (round, site): loss, samples, compute time, Dice per class on the test split."""
        import pandas as pd

        rows = []
        for r in self.history:
            for s in r.sites:
                row = {"round": r.round, "site": s.site, "ok": s.ok, "samples": s.samples, "loss": s.loss,
                       "compute_s": round(s.compute_s, 3)}
                row.update({f"dice[{k}]": v for k, v in s.test_dice.items()})
                rows.append(row)
        return pd.DataFrame(rows)

    def dice_table(self, round: int = -1) -> str:
        """A plain-text table: one row per site, Dice per class of the global model on the test split."""
        r = self.history[round]
        classes = self.plan.labels[1:]
        head = f"{'site':<28}" + "".join(f"{c:>12}" for c in classes) + f"{'mean':>10}"
        lines = [f"round {r.round}: global model Dice on each site's test split", head, "-" * len(head)]
        for s in r.sites:
            vals = [s.test_dice.get(c) for c in classes]
            cells = "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in vals)
            known = [v for v in vals if v is not None]
            mean = f"{sum(known) / len(known):.3f}" if known else "-"
            lines.append(f"{s.site:<28}{cells}{mean:>10}" + ("" if s.ok else f"  (dropped: {s.error})"[:80]))
        return "\n".join(lines)

    def results(self) -> dict:
        return {"experiment_id": self.experiment_id, "plan": self.plan.model_dump(mode="json"),
                "plan_hash": self.plan.content_hash, "strategy": self.strategy.config(),
                "sites": [{"node": p.node, "url": p.url, "dataset": p.name} for p in self.pointers],
                "secure_aggregation": self.secure_aggregation, "threshold": self.threshold,
                "secure_neighbours": self.secure_neighbours,
                "rounds": [r.to_dict() for r in self.history]}

    # checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, folder: str | Path) -> Path:
        """Write ``round-NNNN.safetensors`` (global weights), ``strategy-NNNN.safetensors`` (the
        strategy's tensor state, if any) and ``experiment.json`` (state, history, strategy JSON state)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        n = len(self.history)
        weights = folder / f"round-{n:04d}.safetensors"
        weights.write_bytes(self._global_blob()[0])
        state = self.results() | {"completed_rounds": n, "weights": weights.name, "min_nodes": self.min_nodes,
                                  "job_timeout": self.job_timeout, "evaluate": self.evaluate, "seed": self.seed,
                                  "target_rounds": self.rounds, "select": self.select,
                                  "selection": self._save_selection(folder, n),
                                  "strategy_state": self._save_strategy_state(folder, n)}
        tmp = folder / "experiment.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(folder / "experiment.json")
        return folder / "experiment.json"

    @classmethod
    def resume(cls, folder: str | Path, pointers: list[DatasetPointer], strategy: Strategy | None = None) -> Experiment:
        """Continue an experiment from its last checkpoint (same plan, same experiment id).

        ``strategy`` defaults to the checkpoint's, rebuilt from its config; one passed must have
        the same config. Either way the strategy's saved state (moments, loss histories) is restored.
        """
        folder = Path(folder)
        state = json.loads((folder / "experiment.json").read_text())
        saved = state.get("strategy", {"name": "fedavg"})
        if strategy is None:
            strategy = from_config(saved)
        elif strategy.config() != saved:
            raise ValueError(f"the checkpoint was made with strategy {saved}, not {strategy.config()}; "
                             "pass an equal strategy, or none to rebuild the saved one")
        strategy.load_state_dict(_load_strategy_state(folder, state.get("strategy_state")))
        plan = Plan.model_validate(state["plan"])
        weights = tensors.loads((folder / state["weights"]).read_bytes())
        exp = cls(plan, pointers, strategy=strategy, rounds=state["target_rounds"], min_nodes=state["min_nodes"],
                  job_timeout=state["job_timeout"], evaluate=state["evaluate"], checkpoint_dir=folder,
                  seed=state["seed"], initial=weights, select=state.get("select", False),
                  secure_aggregation=state.get("secure_aggregation", False), threshold=state.get("threshold"),
                  secure_neighbours=state.get("secure_neighbours"))
        exp.experiment_id = state["experiment_id"]
        if exp.selection:
            exp.selection = ModelSelection(exp.plan, exp.experiment_id)
            exp.selection.load(_load_strategy_state(folder, state.get("selection")))
        exp.history = [_round_from_dict(r) for r in state["rounds"]]
        return exp

    def _save_selection(self, folder: Path, n: int) -> dict | None:
        if not self.selection:
            return None
        st = self.selection.state()
        path = folder / f"selection-{n:04d}.safetensors"
        if st.tensors:
            path.write_bytes(tensors.dumps(st.tensors))
        return {"meta": st.meta, "tensors": path.name if st.tensors else None}

    def _save_strategy_state(self, folder: Path, n: int) -> dict:
        """Tensors to ``strategy-NNNN.safetensors``, metadata inline as JSON; never pickled."""
        st = self.strategy.state_dict()
        out = {"meta": st.meta, "tensors": None}
        if st.tensors:
            path = folder / f"strategy-{n:04d}.safetensors"
            path.write_bytes(tensors.dumps(st.tensors))
            out["tensors"] = path.name
        return out


def _load_strategy_state(folder: Path, saved: dict | None) -> StrategyState:
    if not saved:
        return StrategyState()
    blob = tensors.loads((folder / saved["tensors"]).read_bytes()) if saved.get("tensors") else {}
    return StrategyState(tensors=blob, meta=saved.get("meta") or {})


def _round_from_dict(d: dict) -> RoundResult:
    d = dict(d)
    d.pop("overhead_s", None)
    d["sites"] = [SiteResult(**s) for s in d["sites"]]
    return RoundResult(**d)


def _mean_dice(dicts: list[dict]) -> float:
    vals = [v for d in dicts for v in d.values() if v is not None]
    return sum(vals) / len(vals) if vals else math.nan
