"""From outside a real node over HTTPS: metrics about a budgeted dataset are noised and accounted, or refused.

The attack of the issue: with a budget of epsilon 0, evaluate jobs with weights of the scientist's
choice on every split were accepted and wrote nothing to the ledger; the reported Dice of a model
that predicts one class everywhere is a function of a patient's organ volume.
"""

import pytest
from homes import wait_job

import voxgrid
from voxgrid import tensors
from voxgrid.client import AccessRefused, NodeClient, RequestRefused
from voxgrid.datasets import default_sites
from voxgrid.nodes.local.federation import LocalFederation
from voxgrid.plan import initial_weights
from voxgrid.wire import JobRequest

pytestmark = pytest.mark.slow

GAUSS = {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    fed = LocalFederation.create(tmp_path_factory.mktemp("metrics"),
                                 default_sites(n_sites=1, shape=(32, 32, 32), n_volumes=6), splits=(0.34, 0.33, 0.33))
    with fed.start():
        pointer = fed.connect().search("#ct")[0]
        owner = NodeClient(pointer.url, fed.owner_token(0), fed.ca_cert)
        yield pointer, owner


def _plan(privacy=GAUSS):
    return voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), local_epochs=1,
                             steps_per_epoch=1, privacy=privacy)


def _submit(pointer, kind="evaluate", split="val", seed=0, privacy=GAUSS):
    plan = _plan(privacy)
    ref = pointer.client.put_weights(tensors.dumps(initial_weights(plan)))
    return pointer.client.submit(JobRequest(kind=kind, experiment_id="probe", round=0, dataset=pointer.name,
                                            plan=plan.model_dump(mode="json"), plan_hash=plan.content_hash,
                                            weights_id=ref.weights_id, split=split, seed=seed))




def test_metrics_of_a_budgeted_dataset_are_releases(site):
    pointer, owner = site
    owner.set_budget(pointer.name, epsilon=0.0, delta=1e-5, scientist="scientist")
    for split in ("train", "val", "test"):  # the attack: free evaluations of chosen weights on every split
        with pytest.raises(AccessRefused, match="privacy budget exceeded"):
            _submit(pointer, split=split)
    with pytest.raises(AccessRefused, match="privacy budget exceeded"):
        _submit(pointer, kind="train")
    assert owner.ledger().entries == [] and len(owner.ledger().refusals) == 4

    owner.set_budget(pointer.name, epsilon=1000.0, delta=1e-5, scientist="scientist")
    with pytest.raises(AccessRefused, match=r"plan\.privacy"):
        _submit(pointer, privacy=None)  # nothing to calibrate the Dice's noise with: refused, not leaked
    jobs = [_submit(pointer, seed=s).job_id for s in range(1, 13)]
    runs = [wait_job(pointer.client, j) for j in jobs]
    assert {r.state for r in runs} == {"done"}, [r.error for r in runs]
    # The same untrained weights on the same split (true Dice 0): only the noise tells the runs apart.
    # Each noised value is clipped to 0 half the time, so all twelve equal has probability 2^-12.
    assert len({r.metrics.dice["pancreas"] for r in runs}) > 1
    assert all(0 <= r.metrics.dice["pancreas"] <= 1 and r.metrics.dice["tumor"] is None for r in runs)
    assert all(r.privacy.dp and r.privacy.metrics["dice"] == "noised" and r.privacy.epsilon > 0 for r in runs)
    train = wait_job(pointer.client, _submit(pointer, kind="train").job_id)
    assert train.state == "done" and train.metrics.loss is None  # un-noised training loss no longer leaves
    assert train.privacy.metrics == {"dice": "noised", "loss": "withheld"}
    released = [e for e in owner.ledger().entries if e.state == "released"]
    assert [e.mechanism for e in released] == ["gaussian_dice"] * 12 + ["gaussian_update+gaussian_dice"]


@pytest.mark.parametrize("noise", [1e-3, 1e-300])
def test_a_tiny_noise_multiplier_is_accounted_or_refused_never_a_crash(site, noise):
    """Once a 500 from the accountant (1e-300), or tens of GB asked of the PRV accountant (1e-3)."""
    pointer, owner = site
    tiny = {**GAUSS, "noise_multiplier": noise}
    with pytest.raises(RequestRefused, match="noise multiplier") as refused:
        pointer.client.privacy_estimate(pointer.name, tiny)
    assert refused.value.status == 422
    with pytest.raises(RequestRefused, match="noise multiplier"):
        _submit(pointer, kind="train", privacy=tiny)
    assert owner.health().status == "ok"
