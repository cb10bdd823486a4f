"""The experiment: the scientist's federated loop over pointers.

Each round: send the global weights and the plan to every selected node, wait for their updates
(dropping nodes that fail or time out, as long as ``min_nodes`` answered), aggregate with the
strategy, score the new global model on each site's test split, checkpoint.

Jobs run through :class:`voxgrid.jobs.JobRunner` (``exp.jobs``); checkpoints are
:mod:`voxgrid.checkpoints`, reports and round results :mod:`voxgrid.reports`.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from voxgrid import checkpoints, reports, tensors
from voxgrid.approvals import ApprovalTable, approval_hint, approvals, request_approval
from voxgrid.approvals import wait as wait_approvals
from voxgrid.client import VoxgridError
from voxgrid.jobs import JOB_ERRORS, JobRunner, Ticket, across_nodes, describe
from voxgrid.plan import Plan, initial_weights
from voxgrid.pointers import DatasetPointer
from voxgrid.privacy import PrivacySpec
from voxgrid.reports import RoundResult, SiteResult
from voxgrid.secure import check_secure, round_config, secure_round
from voxgrid.selection import ModelSelection, client_update, dice_noise_sd, mean_score
from voxgrid.sequential import sequential_round
from voxgrid.strategies import FedAvg, Strategy
from voxgrid.tensors import StateDict
from voxgrid.wire import NAME_RE, JobRequest, JobStatus, SecureAggregation

__all__ = ["Experiment", "RoundFailed", "RoundResult", "SiteResult"]


class RoundFailed(VoxgridError):
    """Fewer than ``min_nodes`` nodes answered a round; the global model is unchanged."""


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

    Jobs go through ``exp.jobs`` (:class:`voxgrid.jobs.JobRunner`): a node that cannot be reached
    while its job runs is polled again, with backoff, for up to ``exp.jobs.unreachable_timeout``
    seconds (60 by default) before it is dropped from the round.
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
        if spec is not None and spec.dp_sgd is not None and (spec.dp_sgd.rounds or rounds) < rounds:
            raise ValueError(f"plan.privacy.rounds: the target epsilon covers {spec.dp_sgd.rounds} rounds but the "
                             f"experiment runs {rounds}, which would spend past it: set rounds to at least {rounds}")
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
        # Jobs run through one runner, which uploads each weight set to each node once: the weights
        # scored after round r are the ones round r + 1 trains from, so a node gets those bytes once.
        self.jobs = JobRunner(job_timeout)
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
        sites = [SiteResult.from_status(p, st, err) for p, (st, err) in zip(self.pointers, outcomes, strict=True)]
        # the critical path: the slowest node, or with a sequential strategy every hop one after another
        computes = [s.compute_s for s in sites if s.ok]
        compute = sum(computes) if self.strategy.sequential else max(computes, default=0.0)
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
            reasons = "; ".join(f"{p.node}: {err}" for p, (_, err) in zip(self.pointers, outcomes, strict=True) if err)
            hint = approval_hint(self.pointers, [err for _, err in outcomes])  # sites under review
            raise RoundFailed(f"round {rnd}: only {answered} of {len(self.pointers)} nodes answered, "
                              f"min_nodes={self.min_nodes} ({reasons}){extra}{hint}")

    def _plain_round(self, rnd: int) -> list[tuple[JobStatus | None, str | None]]:
        """Every node's update is downloaded and the strategy aggregates them."""
        if self.strategy.sequential:  # cyclic: the model visits the sites in turn, no aggregation
            return sequential_round(self, rnd)
        blob, wid = self._global_blob()
        trained = across_nodes(lambda p: self._train_one(p, rnd, blob, wid), self.pointers)
        outcomes = [(st, err) for st, _, err in trained]
        self._check_answered(rnd, outcomes)
        updates = [client_update(p, st, delta)
                   for p, (st, delta, err) in zip(self.pointers, trained, strict=True) if err is None]
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
                          weights_id=weights_id, split=split,
                          evaluate=(self.evaluate or self.select) and kind == "train",
                          seed=self.seed * 100003 + rnd, secure=secure)

    # jobs (through self.jobs; the job timeout is read at each submission) ------------------------
    def _put_weights(self, p: DatasetPointer, blob: bytes, weights_id: str, force: bool = False) -> bool:
        """Upload ``blob`` unless these weights were already sent to the node; True if uploaded."""
        return self.jobs.put_weights(p, blob, weights_id, force=force)

    def _submit(self, p: DatasetPointer, req: JobRequest, blob: bytes) -> Ticket:
        """Submit (uploading the weights first if needed); the ticket holds the job's deadline."""
        return self.jobs.submit(p, req, blob, timeout=self.job_timeout)

    def _wait(self, p: DatasetPointer, ticket: Ticket) -> JobStatus:
        return self.jobs.wait(p, ticket)

    def _await(self, p: DatasetPointer, req: JobRequest, blob: bytes) -> JobStatus:
        """Upload weights (if the node lacks them), submit, long-poll until the job ends or the timeout passes."""
        return self._wait(p, self._submit(p, req, blob))

    def _train_one(self, p: DatasetPointer, rnd: int, blob: bytes, weights_id: str):
        try:
            st = self._await(p, self._job(p, rnd, weights_id, "train"), blob)
            return st, self.jobs.update(p, st, like=self.global_weights), None
        except JOB_ERRORS as exc:
            return None, None, describe(exc)

    def _global_blob(self) -> tuple[bytes, str]:
        """The global weights as safetensors and their digest, made once per weight set: scoring,
        checkpointing and the next round's upload all send the same bytes. The weights are always
        replaced (never changed in place), so the dict's identity says whether they changed."""
        if self._blob_cache is None or self._blob_cache[0] is not self.global_weights:
            blob = tensors.dumps(self.global_weights)
            self._blob_cache = (self.global_weights, blob, tensors.digest(blob))
        return self._blob_cache[1], self._blob_cache[2]

    def _score(self, rnd: int, sites: list[SiteResult], split: str = "test") -> None:
        """Score the global model on every site's ``split``; on the test split each site also keeps the std of
        the noise its node added to those Dice (budgeted datasets), the val split feeds selection."""
        blob, wid = self._global_blob()

        def one(p: DatasetPointer) -> tuple[dict, float | None]:
            try:
                st = self._await(p, self._job(p, rnd, wid, "evaluate", split=split), blob)
                return dict(st.metrics.dice), dice_noise_sd(st.privacy)
            except JOB_ERRORS:
                return {}, None

        scored = across_nodes(one, self.pointers)
        for site, (dice, sd) in zip(sites, scored, strict=True):
            if split == "test":
                site.test_dice, site.test_dice_noise_sd = dice, sd
            else:
                site.global_val_dice = dice
        self._score_noise_sd = max((sd or 0.0 for _, sd in scored), default=0.0)

    def _select(self, rnd: int, sites: list[SiteResult]) -> None:
        """Score the new global model on every site's val split; keep it if it is the best so far."""
        if len(self.pointers) == 1 and type(self.strategy) is FedAvg:
            sites[0].global_val_dice = dict(sites[0].val_dice)  # one site: the global model is its local one
            self._score_noise_sd = dice_noise_sd(sites[0].privacy) or 0.0
        else:
            self._score(rnd, sites, split="val")
        self.selection.observe_global(rnd, self.global_weights,
                                      {s.site: mean_score(s.global_val_dice) for s in sites if s.ok},
                                      noise_sd=self._score_noise_sd)

    # privacy (voxgrid.reports) -------------------------------------------------------------------
    def privacy_estimate(self, rounds: int | None = None):
        """What the remaining rounds would cost at each node, asked of the nodes before anything runs.

        Returns a DataFrame: one row per site with mechanism, epsilon per release, the projected total
        and each budget's remaining epsilon (nodes refuse a job that would exceed a budget).
        """
        releases = ((self.rounds if rounds is None else rounds) - len(self.history)) * self.strategy.train_jobs_per_round()
        return reports.privacy_estimate(self.pointers, self.plan, releases)

    def privacy_summary(self):
        """Every receipt the nodes sent with their updates: one row per (round, site)."""
        return reports.privacy_summary(self.history)

    # the owners' decisions (voxgrid.approvals) --------------------------------------------------
    def request_approval(self, purpose: str, releases: int | None = None) -> ApprovalTable:
        """Ask the owner of every dataset of the experiment to approve its plan (sites whose policy is
        ``review`` run only approved plans). ``releases``: jobs to ask for at each site (default: what the
        remaining rounds need: a train job, plus an evaluate job for ``evaluate`` and one for ``select``, a
        round). Returns one row per site: node, dataset, state, since, reason."""
        if releases is None:
            rounds = max(self.rounds - len(self.history), 1)
            releases = rounds * (self.strategy.train_jobs_per_round() + int(self.evaluate) + int(self.select))
        return request_approval(self.pointers, self.plan, purpose, releases)

    def approvals(self) -> ApprovalTable:
        """Where this plan's requests stand at every site (re-read from the nodes)."""
        return approvals(self.pointers, self.plan.content_hash)

    def wait_for_approvals(self, timeout: float = 3600.0, poll: float = 10.0) -> ApprovalTable:
        """Wait until every site's owner approved this plan; returns the table. Raises
        :class:`~voxgrid.approvals.ApprovalsNotGranted` (with ``.table``) at once when an owner denied or
        revoked it, or after ``timeout`` seconds."""
        return wait_approvals(self.pointers, self.plan.content_hash, timeout, poll)

    # reading results (voxgrid.reports) -----------------------------------------------------------
    def history_frame(self):
        """One row per (round, site): loss, samples, compute time, Dice per class on the test split."""
        return reports.history_frame(self.history)

    def dice_table(self, round: int = -1) -> str:
        """A plain-text table: one row per site, Dice per class of the global model on the test split."""
        return reports.dice_table(self.history[round], self.plan.labels[1:])

    def results(self) -> dict:
        return reports.results(self)

    # checkpoints (voxgrid.checkpoints) -----------------------------------------------------------
    def save_checkpoint(self, folder: str | Path) -> Path:
        """Write ``round-NNNN.safetensors`` (global weights), ``strategy-NNNN.safetensors`` (the
        strategy's tensor state, if any) and ``experiment.json`` (state, history, strategy JSON state)."""
        settings = {"min_nodes": self.min_nodes, "job_timeout": self.job_timeout, "evaluate": self.evaluate,
                    "seed": self.seed, "target_rounds": self.rounds, "select": self.select}
        return checkpoints.save(folder, completed=len(self.history), weights=self._global_blob()[0],
                                results=self.results(), settings=settings, strategy=self.strategy,
                                selection=self.selection)

    @classmethod
    def resume(cls, folder: str | Path, pointers: list[DatasetPointer], strategy: Strategy | None = None) -> Experiment:
        """Continue an experiment from its last checkpoint (same plan, same experiment id).

        ``strategy`` defaults to the checkpoint's, rebuilt from its config; one passed must have
        the same config. Either way the strategy's saved state (moments, loss histories) is restored.
        """
        saved = checkpoints.load(folder)
        strategy = saved.strategy(strategy)
        exp = cls(saved.plan, pointers, strategy=strategy, checkpoint_dir=saved.folder, initial=saved.weights(),
                  **saved.settings())
        exp.experiment_id = saved.experiment_id
        if exp.selection:
            exp.selection = ModelSelection(exp.plan, exp.experiment_id)
            exp.selection.load(saved.selection_state())
        exp.history = saved.history()
        return exp
