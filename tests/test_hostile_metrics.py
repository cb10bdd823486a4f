"""Every number a job reports about a budgeted dataset is a release: noised and accounted, or withheld.

Issue: with a budget of epsilon 0, evaluate jobs (weights of the scientist's choice, any split) were
accepted and wrote nothing to the ledger, and a gaussian_update job reported its exact training loss.
Fast: a NodeService in-process with a stand-in executor; the real-process version is in
test_hostile_metrics_node.py.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from test_privacy_node import ALICE, GAUSS, OWNER, finish, node, request  # noqa: F401  (fixture)
from voxgrid.nodes.service.node import BudgetRefused, Invalid
from voxgrid.privacy.accountant import GaussianEvent, epsilon
from voxgrid.privacy.metrics import MetricsRelease, dice_sensitivity, release_dice
from voxgrid.wire import BudgetSet, EstimateRequest, Metrics


def evaluate(service, privacy=GAUSS, split="val", seed=0):
    req = request(service, privacy)
    return req.model_copy(update={"kind": "evaluate", "split": split, "seed": seed})


def test_dice_sensitivity_counts_a_patients_volumes_over_the_split():
    vols = [SimpleNamespace(split="val", case_id=f"c{i}", patient=p) for i, p in enumerate(["a", "a", "b", "c"])]
    assert dice_sensitivity(vols, "val", 1) == pytest.approx(2 / 4)  # patient a moves two of four volumes
    assert dice_sensitivity(vols, "val", 4) == pytest.approx(2 * 2 / 4)  # sqrt(4) classes
    with pytest.raises(ValueError, match="no volumes in split 'test'"):
        dice_sensitivity(vols, "test", 1)


def test_released_dice_is_noised_clipped_or_withheld():
    noised = MetricsRelease(dice="noised", loss="withheld", split="val", noise_multiplier=1.0, sensitivity=0.5,
                            delta=1e-5)
    gen = torch.Generator().manual_seed(1)
    draws = [release_dice({"liver": 0.5, "tumor": None}, noised, gen) for _ in range(200)]
    values = [d["liver"] for d in draws]
    assert all(d["tumor"] is None for d in draws)  # a class the site does not annotate: published
    assert all(0.0 <= v <= 1.0 for v in values) and len(set(values)) > 100  # noised, post-processed into [0, 1]
    assert 0.5 * 0.5 < torch.tensor(values).std() < 0.5  # std ~ 0.5, shrunk by the clip to [0, 1]
    withheld = MetricsRelease(dice="not computed", loss="withheld")
    assert release_dice({"liver": 0.5}, withheld, gen) == {"liver": None}
    assert noised.events() == [GaussianEvent(1.0, 1.0, 1)] and withheld.events() == []


def test_with_a_budget_of_zero_every_evaluate_job_is_refused_and_recorded(node):  # noqa: F811
    node.set_budget(OWNER, BudgetSet(dataset="ct", scientist="alice", epsilon=0.0, delta=1e-5))
    for split in ("train", "val"):
        with pytest.raises(BudgetRefused, match="privacy budget exceeded for dataset 'ct'"):
            node.submit(ALICE, evaluate(node, split=split))
    assert node.executor.jobs == [] and len(node.ledger_view(OWNER).refusals) == 2


def test_on_a_budgeted_dataset_unnoised_metrics_are_refused_naming_the_fix(node):  # noqa: F811
    node.set_budget(OWNER, BudgetSet(dataset="ct", epsilon=100.0, delta=1e-5))
    with pytest.raises(BudgetRefused, match=r"the Dice this job would report is a release.*plan\.privacy"):
        node.submit(ALICE, evaluate(node, privacy=None))
    with pytest.raises(BudgetRefused, match="evaluate=False"):  # a percentile chain adds no noise to use
        node.submit(ALICE, request(node, {"mechanism": "percentile", "fraction": 0.5}))
    assert node.executor.jobs == []


def test_an_evaluate_job_on_a_budgeted_dataset_is_noised_accounted_and_receipted(node):  # noqa: F811
    node.set_budget(OWNER, BudgetSet(dataset="ct", scientist="alice", epsilon=100.0, delta=1e-5))
    job = node.submit(ALICE, evaluate(node))
    entry = node.ledger.entry(job.job_id)
    release = MetricsRelease.in_parameters(entry.parameters)
    # One val volume of one patient, one class: sensitivity 1, the plan's noise multiplier 4.
    assert (entry.mechanism, entry.state, release.dice, release.sensitivity) == ("gaussian_dice", "reserved", "noised", 1.0)
    assert entry.epsilon == pytest.approx(epsilon([GaussianEvent(4.0, 1.0, 1)], 1e-5))
    node._on_event({"event": "done", "job_id": job.job_id, "metrics": Metrics(dice={"pancreas": 0.3}).model_dump()})
    st = node.job_status(ALICE, job.job_id)
    assert st.state == "done" and node.ledger.entry(job.job_id).state == "released"
    assert st.privacy.dp and st.privacy.metrics == {"dice": "noised", "loss": "not computed"}
    assert "noise std 4" in st.privacy.note and node.ledger.budgets("ct")[0].spent == pytest.approx(entry.epsilon)


def test_a_train_job_on_a_budgeted_dataset_pays_for_its_validation_dice(node):  # noqa: F811
    node.set_budget(OWNER, BudgetSet(dataset="ct", epsilon=100.0, delta=1e-5))
    job = node.submit(ALICE, request(node, GAUSS))  # evaluate=True by default: val Dice
    entry = node.ledger.entry(job.job_id)
    assert entry.mechanism == "gaussian_update+gaussian_dice"
    both = epsilon([GaussianEvent(2.0, 1.0, 1), GaussianEvent(4.0, 1.0, 1)], 1e-5)
    assert entry.epsilon == pytest.approx(both) and entry.epsilon > epsilon([GaussianEvent(2.0, 1.0, 1)], 1e-5)
    finish(node, job.job_id)
    assert node.job_status(ALICE, job.job_id).privacy.metrics == {"dice": "noised", "loss": "withheld"}
    quiet = node.submit(ALICE, request(node, GAUSS, round=1).model_copy(update={"evaluate": False}))
    assert node.ledger.entry(quiet.job_id).mechanism == "gaussian_update"  # no Dice, no Dice cost


def test_without_a_budget_evaluate_jobs_stay_free_and_the_receipt_says_the_metrics_are_exact(node):  # noqa: F811
    job = node.submit(ALICE, evaluate(node, privacy=None))
    assert node.ledger.entry(job.job_id) is None
    train = node.submit(ALICE, request(node, GAUSS))
    finish(node, train.job_id)
    receipt = node.job_status(ALICE, train.job_id).privacy
    assert receipt.metrics == {"dice": "exact", "loss": "withheld"} and "outside any epsilon" in receipt.note
    assert not math.isnan(receipt.epsilon)


@pytest.mark.parametrize("noise", [1e-3, 1e-300])
def test_noise_too_small_for_any_guarantee_is_refused_as_invalid(node, noise):  # noqa: F811
    """Once a 500 (1e-300: the accountant divided by zero) or tens of GB for the PRV grid (1e-3)."""
    tiny = {**GAUSS, "noise_multiplier": noise}
    with pytest.raises(Invalid, match="noise multiplier"):
        node.submit(ALICE, request(node, tiny))
    with pytest.raises(Invalid, match="noise multiplier"):
        node.privacy_estimate(ALICE, EstimateRequest(dataset="ct", privacy=tiny))
    assert node.executor.jobs == [] and node.ledger.entries() == []
