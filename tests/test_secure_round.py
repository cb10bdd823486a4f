"""The scientist's side of a secure round (voxgrid.secure) with seven parties on a SecAgg+ graph.

Seven real node processes would cost minutes on two cores, so each party here is the real protocol
client (:class:`SecAggClient`, real keys and CA) behind a stand-in for its HTTPS client; the transport
itself is covered over real nodes in test_e2e_secure.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from voxgrid.client import Unreachable
from voxgrid.privacy.secagg import SecAggClient, SecAggConfig, pack_words
from voxgrid.secure import check_secure, secure_round
from voxgrid.strategies import FedAvg

NAMES = [f"site-{c}" for c in "abcdefg"]  # the node_identities fixture (tests/conftest.py)


class PartyClient:
    """What ``secure_round`` calls on a node, answered by that node's real protocol client."""

    def __init__(self, name, key, cert, ca, vector, weight, fail_at=None):
        self.name, self.key, self.cert, self.ca = name, key, cert, ca
        self.vector, self.weight, self.fail_at = vector, weight, fail_at
        self.protocol = None

    def _maybe_fail(self, step):
        if self.fail_at == step:
            raise Unreachable(f"{self.name}: cannot reach server (link cut at {step})")

    def secagg_keys(self, req):
        self._maybe_fail("keys")
        self.protocol = SecAggClient(SecAggConfig.from_json(req.secure.config), self.name, self.key, self.cert, self.ca)
        return self.protocol.advertise()

    def secagg_shares(self, req):
        return self.protocol.share_keys(req.roster)

    def secagg_masked(self, req):
        self._maybe_fail("masked")
        return pack_words(self.protocol.mask(self.vector, self.weight, req.inbox))

    def secagg_reveal(self, req):
        self._maybe_fail("reveal")
        return self.protocol.reveal(req)


@dataclass
class Party:
    node: str
    name: str
    client: PartyClient


def test_a_secagg_plus_round_with_dropouts_recovers_the_survivors_weighted_mean(node_identities):
    ids, ca = node_identities
    rng = np.random.default_rng(0)
    like = {"w": torch.zeros(3, 5), "b": torch.zeros(4)}
    vectors = {n: rng.uniform(-0.05, 0.05, 19).astype(np.float32) for n in NAMES}
    weights = {n: float(i + 1) for i, n in enumerate(NAMES)}
    fail = {"site-b": "masked", "site-e": "reveal"}  # b drops before its masked update, e after sending it
    parties = [Party(n, f"ds-{n}", PartyClient(n, *ids[n], ca, vectors[n], weights[n], fail.get(n))) for n in NAMES]
    t = check_secure(FedAvg(), parties, None, neighbours=4)
    assert t == 3  # a majority of each node's group of 5
    config = SecAggConfig(experiment_id="exp", round=0, nodes=tuple(NAMES), threshold=t, clip=100.0,
                          max_weight=7.0, bits=32, neighbours=4)
    assert all(len(config.neighbours_of(n)) == 4 for n in NAMES)
    out = secure_round(config=config, weight="samples", pointers=parties, like=like,
                       submit=lambda p, secure: p.node,
                       wait=lambda p, ticket: SimpleNamespace(job_id=f"job-{ticket}"))
    assert out.error is None, out.error
    summed = [n for n in NAMES if n != "site-b"]  # e's masked update is in the sum, though it then failed
    assert [err is None for _, err in out.outcomes] == [n in summed for n in NAMES]
    assert "masked" in out.dropped["site-b"] and "reveal" in out.dropped["site-e"]
    expected = sum(weights[n] * vectors[n].astype(np.float64) for n in summed) / sum(weights[n] for n in summed)
    got = np.concatenate([out.mean_delta[k].reshape(-1).numpy() for k in sorted(like)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert set(out.timings) >= {"submit", "keys", "shares", "train", "reveal", "unmask"}


def test_secure_aggregation_settings_are_checked_before_anything_runs(node_identities):
    parties = [Party(n, f"ds-{n}", None) for n in NAMES]
    with pytest.raises(ValueError, match="neighbours=3"):
        check_secure(FedAvg(), parties, None, neighbours=3)  # the graph's degree must be even
    with pytest.raises(ValueError, match="threshold=2, neighbours=4"):
        check_secure(FedAvg(), parties, 2, neighbours=4)  # not a majority of a group of 5
    assert check_secure(FedAvg(), parties, None) == 4  # complete graph: a majority of 7
