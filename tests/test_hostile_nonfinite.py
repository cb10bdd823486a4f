"""Hostile weights against a real node over HTTPS: NaN in a normalisation buffer, a huge safetensors header.

NaN weights used to switch off the update-level clip downstream (issue 11, finding 1); a 50 MB header
was parsed (finding 6). Both are refused at upload with a message naming the problem.
"""

import hashlib
import json
import struct

import pytest
from homes import wait_job
import torch
from safetensors.torch import load

import voxgrid
from voxgrid import tensors
from voxgrid.client import NodeClient, VoxgridError
from voxgrid.plan import initial_weights
from voxgrid.wire import JobRequest

pytestmark = pytest.mark.slow

BUFFER = "model.0.conv.unit0.adn.N.running_var"  # BatchNorm statistics: unused by a training forward pass


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from voxgrid.datasets import default_sites
    from voxgrid.nodes.local.federation import LocalFederation

    root = tmp_path_factory.mktemp("hostile-nonfinite")
    fed = LocalFederation.create(root, default_sites(n_sites=1, shape=(32, 32, 32), n_volumes=4))
    fed.start()
    p = fed.nodes[0]
    with NodeClient(p.url, fed.scientist_token, fed.ca_cert) as client:
        yield client.datasets()[0].name, client
    fed.stop()


def _plan():
    base = voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), channels=(4, 8),
                             strides=(2,), num_res_units=1, local_epochs=1, steps_per_epoch=1)
    return voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), channels=(4, 8),
                             strides=(2,), num_res_units=1, local_epochs=1, steps_per_epoch=1,
                             network={**base.network, "norm": "batch"},
                             privacy={"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 1.0,
                                      "delta": 1e-5})


def _assert_healthy(client):
    assert client.health().status == "ok"
    ref = client.put_weights(tensors.dumps(initial_weights(_plan())))  # clean weights still go in
    assert ref.bytes > 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor_and_never_stored(node, value):
    name, client = node
    plan = _plan()
    weights = initial_weights(plan)
    assert BUFFER in weights
    weights[BUFFER] = weights[BUFFER].clone()
    weights[BUFFER][1] = value
    blob = tensors.dumps(weights)
    with pytest.raises(voxgrid.RequestRefused) as e:
        client.put_weights(blob)
    assert e.value.status == 422 and BUFFER in e.value.detail and "non-finite" in e.value.detail
    # nothing was stored: a job naming the blob's address is refused as unknown weights
    with pytest.raises(voxgrid.RequestRefused, match="unknown weights"):
        client.submit(JobRequest(kind="train", experiment_id="hostile", round=0, dataset=name,
                                 plan=plan.model_dump(mode="json"), plan_hash=plan.content_hash,
                                 weights_id=hashlib.sha256(blob).hexdigest(), evaluate=False))
    _assert_healthy(client)


def test_weights_of_a_dtype_no_network_takes_are_refused(node):
    _, client = node
    weights = initial_weights(_plan())
    weights[BUFFER] = weights[BUFFER] > 0  # bool
    with pytest.raises(voxgrid.RequestRefused) as e:
        client.put_weights(tensors.dumps(weights))
    assert e.value.status == 422 and BUFFER in e.value.detail and "dtype" in e.value.detail


def test_a_huge_safetensors_header_is_refused_and_the_node_stays_healthy(node):
    _, client = node
    header = json.dumps({"__metadata__": {"pad": "x" * (3 << 20)},
                         "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.0)
    assert torch.equal(load(blob)["w"], torch.tensor([1.0]))  # otherwise a valid safetensors file
    with pytest.raises(voxgrid.RequestRefused) as e:
        client.put_weights(blob)
    assert 400 <= e.value.status < 500
    assert f"header is {len(header)} bytes" in e.value.detail and "limit is 1048576" in e.value.detail
    _assert_healthy(client)


def test_a_job_whose_update_is_not_finite_fails_and_releases_nothing(node):
    """Finite weights, a learning rate that overflows float32: the update is not finite, so the job fails
    before any filter runs (a NaN update once passed the clip unclipped), and no update can be fetched."""
    name, client = node
    base = _plan()
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), channels=(4, 8),
                             strides=(2,), num_res_units=1, local_epochs=1, steps_per_epoch=3,
                             optimizer={"_target_": "SGD", "lr": 1e38}, privacy=base.privacy)
    ref = client.put_weights(tensors.dumps(initial_weights(plan)))
    job = client.submit(JobRequest(kind="train", experiment_id="overflow", round=0, dataset=name,
                                   plan=plan.model_dump(mode="json"), plan_hash=plan.content_hash,
                                   weights_id=ref.weights_id, evaluate=False))
    st = wait_job(client, job.job_id)
    assert st.state == "failed" and "not finite" in st.error and "nothing was released" in st.error
    assert not st.has_update and st.privacy is None
    with pytest.raises(VoxgridError):
        client.update(job.job_id)
    _assert_healthy(client)
