"""One scientist's secure-aggregation state cannot push out another's.

The node keeps each round's secrets in memory, a bounded number of rounds. The bound was shared by
every scientist: one who opened 64 throwaway rounds evicted everyone else's, whose rounds then
failed ("no secure aggregation keys"). Now the bound holds per scientist.
"""

import shutil

from voxgrid.nodes.service.secure import KEEP_ROUNDS, NodeSecAgg
from voxgrid.pki import create_ca, issue_certificate
from voxgrid.privacy.secagg import SecAggConfig
from voxgrid.wire import SecAggKeysRequest, SecureAggregation


def _node(tmp_path) -> NodeSecAgg:
    ca = create_ca(tmp_path / "ca")
    ident = issue_certificate(ca, tmp_path / "certs", "node-a", ["localhost"])
    tls = tmp_path / "tls"
    tls.mkdir()
    for src, name in ((ident.cert, "server.crt"), (ident.key, "server.key"), (ca.cert, "ca.crt")):
        shutil.copy(src, tls / name)
    return NodeSecAgg("node-a", tls)


def _keys(experiment: str, round: int) -> SecAggKeysRequest:
    config = SecAggConfig(experiment, round, ("node-a", "node-b", "node-c"), threshold=2)
    return SecAggKeysRequest(dataset="ct", secure=SecureAggregation(config=config.to_json()))


def test_a_flood_of_rounds_evicts_only_the_flooders_own(tmp_path):
    node = _node(tmp_path)
    alice = node.keys("alice", _keys("study", 0))
    for i in range(KEEP_ROUNDS + 10):
        node.keys("mallory", _keys(f"junk-{i}", 0))
    assert node.keys("alice", _keys("study", 0)) == alice  # the same keys: alice's round survived
    assert node._client("alice", "study", 0) is not None
    kept = [slot for slot in node._rounds if slot[0] == "mallory"]
    assert len(kept) == KEEP_ROUNDS and kept[0][1] == "junk-10"  # mallory lost her own oldest rounds
