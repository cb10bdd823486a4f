"""A scientist tries to fill a node's disk with weights, from outside, over HTTPS (a real node process).

The node's owner set a small storage quota in node.json before starting it: uploads past it are
refused with a clear 413, identical bytes again cost nothing, the node stays healthy, and another
scientist can still upload.
"""

import json

import pytest
import torch

from voxgrid import tensors
from voxgrid.client import NodeClient, RequestRefused

pytestmark = pytest.mark.slow


def blob(seed: int) -> bytes:
    return tensors.dumps({"w": torch.full((10_000,), float(seed))})


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    from voxgrid.datasets import default_sites
    from voxgrid.nodes.local.federation import LocalFederation

    root = tmp_path_factory.mktemp("storage")
    fed = LocalFederation.create(root, default_sites(n_sites=1, shape=(32, 32, 32), n_volumes=4))
    config = fed.nodes[0].home / "node.json"
    cfg = json.loads(config.read_text())
    cfg["storage"] = {"quota_bytes": 3 * len(blob(0)), "quota_blobs": 10}
    config.write_text(json.dumps(cfg))
    fed.start()
    yield fed
    fed.stop()


def test_uploads_past_the_quota_are_refused_and_others_still_upload(fed):
    url = fed.nodes[0].url
    with NodeClient(url, fed.owner_token(0), fed.ca_cert) as owner:
        bob_token = owner.issue_token("bob").token
    with NodeClient(url, fed.scientist_token, fed.ca_cert) as alice:
        refs = [alice.put_weights(blob(i)) for i in range(3)]
        for i in range(3, 6):  # the attack: keep sending new weights
            with pytest.raises(RequestRefused) as e:
                alice.put_weights(blob(i))
            assert e.value.status == 413 and e.value.title == "Storage quota exceeded"
            assert "storage quota exceeded for 'scientist'" in e.value.detail
            assert "in 3 weights blob(s)" in e.value.detail
            assert "re-uploading weights you already sent" in e.value.detail
        assert alice.put_weights(blob(0)) == refs[0]  # identical bytes again: free
        assert alice.health().name == fed.nodes[0].name
    with NodeClient(url, bob_token, fed.ca_cert) as bob:
        assert bob.put_weights(blob(100)).bytes == len(blob(100))
    with NodeClient(url, fed.owner_token(0), fed.ca_cert) as owner:
        refused = [a for a in owner.audit() if a.action == "weights.refused"]
        assert len(refused) == 3 and all(a.actor == "scientist" for a in refused)
    blobs = sorted(p.name for p in (fed.nodes[0].home / "blobs").glob("*.safetensors"))
    assert len(blobs) <= 4  # alice's three and bob's one, nothing of the refused
