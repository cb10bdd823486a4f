"""Secure aggregation, the pure protocol core: nodes and aggregator in one process, real keys and a real CA."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from voxgrid.privacy.secagg import (AdvertisedKeys, EncryptedShare, RevealRequest, SecAggClient, SecAggConfig,
                                    SecAggError, SecAggServer, pack_words, unpack_words)
from voxgrid.privacy.secagg import masks

from identities import issue_identities  # test support: tests/identities.py

NAMES = [f"site-{c}" for c in "abcdefg"]


@pytest.fixture
def pki(node_identities):
    """({name: (key, cert_pem)}, ca_pem) for NAMES, from one federation CA (tests/conftest.py)."""
    return node_identities


def clients_for(config, pki):
    ids, ca_pem = pki
    return {n: SecAggClient(config, n, ids[n][0], ids[n][1], ca_pem) for n in config.nodes}


def keyed_round(config, pki, skip_keys=(), skip_shares=()):
    """Clients and an aggregator after the key and share phases (nodes in ``skip_*`` dropped there)."""
    clients = clients_for(config, pki)
    server = SecAggServer(config, ca_pem=pki[1])
    for n, c in clients.items():
        if n not in skip_keys:
            server.add_keys(c.advertise())
    roster = server.roster()
    for n, c in clients.items():
        if n not in skip_shares:
            server.route(c.share_keys(roster))
    return clients, server


def run_round(config, pki, vectors, weights, *, drop_before_keys=(), drop_before_shares=(), drop_before_mask=(),
              drop_before_reveal=()):
    """One round through the aggregator; returns (sum, total weight, server, clients)."""
    clients, server = keyed_round(config, pki, skip_keys=drop_before_keys,
                                  skip_shares=(*drop_before_keys, *drop_before_shares))
    inboxes = server.inboxes()
    for n, c in clients.items():
        if n not in (*drop_before_keys, *drop_before_shares, *drop_before_mask):
            words = c.mask(vectors[n], weights[n], inboxes.get(n, []))
            server.add_masked(n, unpack_words(pack_words(words), config.bits, vectors[n].size + 1))
    revealed = []
    for n in server.reveal_request().survivors:
        if n not in drop_before_reveal:
            revealed += clients[n].reveal(server.reveal_request(n))
    total, weight = server.unmask(revealed)
    return total, weight, server, clients


def expected_sum(config, vectors, weights, included):
    return sum(weights[n] * np.clip(vectors[n].astype(np.float64), -config.clip, config.clip) for n in included)


def make_inputs(config, size=1000, seed=0):
    rng = np.random.default_rng(seed)  # test data only; masks never touch numpy generators
    vectors = {n: (rng.standard_normal(size) * 0.7).astype(np.float32) for n in config.nodes}
    weights = {n: float(rng.uniform(0.1, config.max_weight)) for n in config.nodes}
    return vectors, weights


@pytest.mark.parametrize("bits", [32, 64])
def test_sum_of_masked_equals_sum_of_plain_within_the_quantisation_bound(pki, bits):
    config = SecAggConfig("exp-1", 3, tuple(NAMES[:4]), threshold=3, clip=1.0, max_weight=5.0, bits=bits)
    vectors, weights = make_inputs(config)
    total, weight, _, _ = run_round(config, pki, vectors, weights)
    exact = expected_sum(config, vectors, weights, config.nodes)
    # Bound: half a fixed-point step per node, n / (2 * scale); entries beyond clip are clipped.
    assert np.max(np.abs(total - exact)) <= config.error_bound()
    assert config.error_bound() < (1e-7 if bits == 32 else 1e-13)
    assert weight == pytest.approx(sum(weights.values()), abs=len(NAMES) / config.weight_scale)
    assert total.dtype == np.float64 and total.shape == (1000,)
    # The mean the experiment computes from it.
    mean = total / weight
    exact_mean = exact / sum(weights.values())
    assert np.max(np.abs(mean - exact_mean)) < 1e-6


def test_weights_aggregate_to_the_total_and_give_the_weighted_mean(pki):
    config = SecAggConfig("exp-w", 0, tuple(NAMES[:3]), threshold=2, clip=10.0, max_weight=1000.0)
    vectors = {n: np.full(50, float(i + 1), np.float32) for i, n in enumerate(config.nodes)}  # 1, 2, 3
    weights = dict(zip(config.nodes, [100.0, 300.0, 0.0], strict=True))  # a node with weight 0 contributes nothing
    total, weight, _, _ = run_round(config, pki, vectors, weights)
    assert weight == pytest.approx(400.0, abs=1e-5)
    assert np.allclose(total / weight, (100 * 1 + 300 * 2) / 400, atol=1e-5)


def test_one_masked_update_looks_uniform_but_the_quantised_update_does_not(pki):
    config = SecAggConfig("exp-u", 1, tuple(NAMES[:3]), threshold=2)
    vectors = {n: np.linspace(-0.01, 0.01, 20000, dtype=np.float32) for n in config.nodes}
    clients, server = keyed_round(config, pki)
    words = clients[NAMES[0]].mask(vectors[NAMES[0]], 1.0, server.inboxes()[NAMES[0]])

    def chi_square_of_bytes(w):
        counts = np.bincount(np.frombuffer(w.tobytes(), np.uint8), minlength=256)
        expected = counts.sum() / 256
        return float(((counts - expected) ** 2 / expected).sum())

    # 255 degrees of freedom: mean 255, sd ~22.6; 400 is beyond p = 1e-8.
    assert chi_square_of_bytes(words) < 400
    top = np.bincount((words >> np.uint32(28)).astype(np.int64), minlength=16)
    assert ((top - top.mean()) ** 2 / top.mean()).sum() < 60  # 15 dof
    from voxgrid.privacy.secagg.quantize import Quantiser

    plain = np.empty(20000, np.uint32)
    Quantiser(config, 1.0, 20000).into(vectors[NAMES[0]], plain, 0)
    assert chi_square_of_bytes(plain) > 10_000  # the same test catches an unmasked update


def test_masks_come_from_chacha20_keys_not_numpy_generators():
    a, b = masks.expand(b"\x01" * 32, 1000, 32), masks.expand(b"\x02" * 32, 1000, 32)
    assert a.dtype == np.uint32 and not np.array_equal(a, b)
    assert np.array_equal(a, masks.expand(b"\x01" * 32, 1000, 32))  # a deterministic function of the seed
    # The first chunk boundary does not restart the keystream.
    long = masks.expand(b"\x01" * 32, masks.CHUNK + 10, 64)
    assert len(set(long[masks.CHUNK - 5: masks.CHUNK + 5].tolist())) == 10


@pytest.mark.parametrize("neighbours", [None, 4])
@pytest.mark.parametrize("when", ["before_mask", "before_reveal", "before_shares", "mixed"])
def test_dropouts_up_to_n_minus_t_are_recovered(pki, neighbours, when):
    n = 7
    config = SecAggConfig("exp-d", 2, tuple(NAMES[:n]), threshold=4 if neighbours is None else 3,
                          neighbours=neighbours, max_weight=2.0)
    vectors, weights = make_inputs(config, size=300, seed=1)
    if neighbours is None:
        gone = NAMES[1:4]  # n - t = 3
    else:  # each node's group is itself + 4 neighbours and t = 3, so any two may drop
        assert all(len(config.neighbours_of(x)) == 4 for x in config.nodes)
        gone = NAMES[2:4]
    kwargs = {"before_mask": dict(drop_before_mask=gone), "before_reveal": dict(drop_before_reveal=gone),
              "before_shares": dict(drop_before_shares=gone),
              "mixed": dict(drop_before_mask=gone[:1], drop_before_reveal=gone[1:])}[when]
    total, weight, server, _ = run_round(config, pki, vectors, weights, **kwargs)
    included = [x for x in config.nodes if when == "before_reveal" or x not in kwargs.get("drop_before_mask", ())
                and x not in kwargs.get("drop_before_shares", ())]
    assert np.max(np.abs(total - expected_sum(config, vectors, weights, included))) <= config.error_bound()
    assert weight == pytest.approx(sum(weights[x] for x in included), abs=1e-6)
    if when == "before_mask":
        assert server.reveal_request().dropped == sorted(gone)


def test_secagg_plus_graph_is_sparse_symmetric_and_deterministic():
    config = SecAggConfig("exp-g", 5, tuple(f"n{i:02d}" for i in range(12)), threshold=4, neighbours=6)
    graph = {x: config.neighbours_of(x) for x in config.nodes}
    assert all(len(v) == 6 and x not in v for x, v in graph.items())
    assert all(x in graph[y] for x, v in graph.items() for y in v)
    again = SecAggConfig("exp-g", 5, tuple(reversed(config.nodes)), threshold=4, neighbours=6)
    assert graph == {x: again.neighbours_of(x) for x in config.nodes}
    other_round = SecAggConfig("exp-g", 6, config.nodes, threshold=4, neighbours=6)
    assert graph != {x: other_round.neighbours_of(x) for x in config.nodes}
    assert SecAggConfig("e", 0, ("a", "b", "c"), threshold=2, neighbours=4).complete


def test_more_than_n_minus_t_dropouts_fail_cleanly_and_release_nothing(pki):
    config = SecAggConfig("exp-f", 0, tuple(NAMES[:5]), threshold=3)
    vectors, weights = make_inputs(config, size=100)
    # Three of five drop after masking: only two survivors reveal shares.
    with pytest.raises(SecAggError, match=r"only 2 of threshold 3 shares"):
        run_round(config, pki, vectors, weights, drop_before_reveal=NAMES[2:5])
    # Three drop before masking: too few inputs to hide any of them.
    with pytest.raises(SecAggError, match=r"only 2 of threshold 3 nodes sent masked input"):
        run_round(config, pki, vectors, weights, drop_before_mask=NAMES[2:5])


def test_a_failed_unmask_releases_nothing_and_a_late_input_is_refused(pki):
    config = SecAggConfig("exp-f2", 0, tuple(NAMES[:3]), threshold=2)
    vectors, weights = make_inputs(config, size=100)
    clients, server = keyed_round(config, pki)
    inboxes = server.inboxes()
    for n in NAMES[:2]:
        server.add_masked(n, clients[n].mask(vectors[n], weights[n], inboxes[n]))
    request = server.reveal_request()
    assert request.survivors == NAMES[:2] and request.dropped == [NAMES[2]]
    late = clients[NAMES[2]].mask(vectors[NAMES[2]], weights[NAMES[2]], inboxes[NAMES[2]])
    with pytest.raises(SecAggError, match="not possible in phase 'reveal'"):
        server.add_masked(NAMES[2], late)  # its mask key is about to be revealed
    shares = clients[NAMES[0]].reveal(request)
    with pytest.raises(SecAggError, match="only 1 of threshold 2 shares"):
        server.unmask(shares)
    total, _ = server.unmask(shares + clients[NAMES[1]].reveal(request))  # the refused call left the sum intact
    assert np.max(np.abs(total - expected_sum(config, vectors, weights, NAMES[:2]))) <= config.error_bound()


def _keys_phase(pki, config):
    clients = clients_for(config, pki)
    return clients, {n: c.advertise() for n, c in clients.items()}


def test_replayed_key_from_another_round_is_refused(pki):
    old = SecAggConfig("exp-r", 1, tuple(NAMES[:3]), threshold=2)
    new = SecAggConfig("exp-r", 2, tuple(NAMES[:3]), threshold=2)
    _, old_keys = _keys_phase(pki, old)
    clients, keys = _keys_phase(pki, new)
    replayed = old_keys[NAMES[1]]
    with pytest.raises(SecAggError, match=r"site-b.*round 1.*replayed"):
        SecAggServer(new, ca_pem=pki[1]).add_keys(replayed)
    relabelled = replayed.model_copy(update={"round": 2})  # the signature binds the round
    with pytest.raises(SecAggError, match=r"site-b.*signature does not match"):
        clients[NAMES[0]].share_keys([keys[NAMES[0]], relabelled, keys[NAMES[2]]])
    other_exp = SecAggConfig("exp-other", 2, tuple(NAMES[:3]), threshold=2)
    client = SecAggClient(other_exp, NAMES[0], *pki[0][NAMES[0]], pki[1])
    with pytest.raises(SecAggError, match=r"site-b.*signature does not match"):
        client.share_keys([client.advertise(), keys[NAMES[1]].model_copy(update={"experiment_id": "exp-other"})])


def test_duplicated_key_is_refused(pki):
    config = SecAggConfig("exp-dup", 0, tuple(NAMES[:3]), threshold=2)
    clients, keys = _keys_phase(pki, config)
    server = SecAggServer(config)
    server.add_keys(keys[NAMES[0]])
    with pytest.raises(SecAggError, match="already advertised"):
        server.add_keys(keys[NAMES[0]])
    copied = keys[NAMES[1]].model_copy(update={"mask_pk": keys[NAMES[0]].mask_pk})
    with pytest.raises(SecAggError, match=r"site-b.*reuse a public key"):
        clients[NAMES[2]].share_keys([keys[NAMES[0]], copied, keys[NAMES[2]]])


def test_resigned_or_swapped_keys_are_refused(pki, tmp_path):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from voxgrid.privacy.secagg.keys import sign_keys

    config = SecAggConfig("exp-s", 0, tuple(NAMES[:3]), threshold=2)
    clients, keys = _keys_phase(pki, config)
    me, victim, relay = NAMES[0], NAMES[1], NAMES[2]
    own = X25519PrivateKey.generate().public_key().public_bytes_raw()
    # The relay swaps in its own key under the victim's name but cannot sign for the victim.
    swapped = keys[victim].model_copy(update={"mask_pk": base64.b64encode(own).decode()})
    with pytest.raises(SecAggError, match=r"site-b.*signature does not match"):
        clients[me].share_keys([keys[me], swapped, keys[relay]])
    # Re-signed with another node's (valid) certificate: the CN names someone else.
    resigned = sign_keys(pki[0][relay][0], pki[0][relay][1], "exp-s", 0, victim, own,
                         X25519PrivateKey.generate().public_key().public_bytes_raw())
    with pytest.raises(SecAggError, match=r"site-b.*certificate of 'site-c'"):
        clients[me].share_keys([keys[me], resigned, keys[relay]])
    # Signed with a key of a certificate the federation CA never issued.
    rogue = ec.generate_private_key(ec.SECP256R1())
    forged = keys[victim].model_copy(update={"signature": base64.b64encode(rogue.sign(b"x", ec.ECDSA(
        hashes.SHA256()))).decode()})
    with pytest.raises(SecAggError, match=r"site-b"):
        SecAggServer(config, ca_pem=pki[1]).add_keys(forged)
    foreign_ids, _ = issue_identities(tmp_path, [victim])  # a CA of its own, not the federation's
    foreign_key, foreign_cert = foreign_ids[victim]
    fake = sign_keys(foreign_key, foreign_cert, "exp-s", 0, victim, own,
                     X25519PrivateKey.generate().public_key().public_bytes_raw())
    with pytest.raises(SecAggError, match=r"site-b.*not issued by the federation CA"):
        clients[me].share_keys([keys[me], fake, keys[relay]])


def _shared(pki, config):
    clients, keys = _keys_phase(pki, config)
    server = SecAggServer(config)
    for k in keys.values():
        server.add_keys(k)
    roster = server.roster()
    for c in clients.values():
        server.route(c.share_keys(roster))
    return clients, server


def test_share_for_the_wrong_round_or_recipient_is_refused(pki):
    r1 = SecAggConfig("exp-sh", 1, tuple(NAMES[:3]), threshold=2)
    clients, server = _shared(pki, r1)
    a, b = NAMES[0], NAMES[1]
    share = server.inboxes()[a][0]
    assert share.sender == b
    # Relabelled to another round: the associated data no longer matches.
    with pytest.raises(SecAggError, match=r"round 2 \(replayed"):
        clients[a].mask(np.zeros(4, np.float32), 1.0, [share.model_copy(update={"round": 2})])
    r2 = SecAggConfig("exp-sh", 2, tuple(NAMES[:3]), threshold=2)
    clients2, _ = _shared(pki, r2)
    replay = share.model_copy(update={"round": 2})
    with pytest.raises(SecAggError, match=r"share from node 'site-b' does not decrypt"):
        clients2[a].mask(np.zeros(4, np.float32), 1.0, [replay])
    # Redirected to another recipient.
    [b_to_c] = [s for s in server.inboxes()[NAMES[2]] if s.sender == b]
    redirected = b_to_c.model_copy(update={"recipient": a})
    with pytest.raises(SecAggError, match="does not decrypt for 'site-a'"):
        clients[a].mask(np.zeros(4, np.float32), 1.0, [redirected])
    # Intact shares still work afterwards: the refusals changed no state.
    assert clients[a].mask(np.zeros(4, np.float32), 1.0, server.inboxes()[a]).shape == (5,)


def test_a_node_refuses_both_kinds_of_share_for_one_node(pki):
    config = SecAggConfig("exp-b", 0, tuple(NAMES[:5]), threshold=3)
    clients, server = _shared(pki, config)
    inboxes = server.inboxes()
    for n in NAMES[:4]:
        server.add_masked(n, clients[n].mask(np.ones(8, np.float32), 1.0, inboxes[n]))
    honest = server.reveal_request()
    both = RevealRequest(experiment_id="exp-b", round=0, survivors=NAMES[:4], dropped=[NAMES[3], NAMES[4]])
    with pytest.raises(SecAggError, match=r"both kinds of share.*site-d"):
        clients[NAMES[0]].reveal(both)
    first = clients[NAMES[0]].reveal(honest)
    assert {(s.owner, s.kind) for s in first} == {(n, "self_mask") for n in NAMES[:4]} | {(NAMES[4], "mask_key")}
    # Asked later, in a second request, for the other kind: still refused.
    flipped = RevealRequest(experiment_id="exp-b", round=0, survivors=NAMES[:3] + [NAMES[4]], dropped=[NAMES[3]])
    with pytest.raises(SecAggError, match=r"both kinds.*site-d.*revealed earlier"):
        clients[NAMES[0]].reveal(flipped)
    assert clients[NAMES[0]].reveal(honest) == first  # a retried identical request is fine


def test_a_node_refuses_below_threshold_survivors_and_strangers(pki):
    config = SecAggConfig("exp-t", 0, tuple(NAMES[:5]), threshold=3)
    clients, server = _shared(pki, config)
    inboxes = server.inboxes()
    a = clients[NAMES[0]]
    a.mask(np.ones(8, np.float32), 1.0, inboxes[NAMES[0]])
    with pytest.raises(SecAggError, match="only 2 survivors of threshold 3"):
        a.reveal(RevealRequest(experiment_id="exp-t", round=0, survivors=NAMES[:2], dropped=NAMES[2:5]))
    with pytest.raises(SecAggError, match="does not list this node among the survivors"):
        a.reveal(RevealRequest(experiment_id="exp-t", round=0, survivors=NAMES[1:4], dropped=[]))
    with pytest.raises(SecAggError, match=r"outside its neighbour set"):
        a.reveal(RevealRequest(experiment_id="exp-t", round=0, survivors=NAMES[:3] + ["site-z"], dropped=[]))
    sparse = SecAggConfig("exp-t2", 0, tuple(NAMES[:7]), threshold=2, neighbours=2)
    clients, server = _shared(pki, sparse)
    inboxes = server.inboxes()
    for n in sparse.nodes:
        server.add_masked(n, clients[n].mask(np.ones(8, np.float32), 1.0, inboxes[n]))
    stranger = next(x for x in sparse.nodes if x not in sparse.neighbours_of(NAMES[0]) and x != NAMES[0])
    with pytest.raises(SecAggError, match=rf"node\(s\) \[.*'{stranger}'.*\] outside its neighbour set"):
        clients[NAMES[0]].reveal(server.reveal_request())
    assert clients[NAMES[0]].reveal(server.reveal_request(NAMES[0]))


def test_a_node_masks_only_once_and_only_after_sharing(pki):
    config = SecAggConfig("exp-o", 0, tuple(NAMES[:3]), threshold=2)
    c = clients_for(config, pki)[NAMES[0]]
    with pytest.raises(SecAggError, match="share_keys\\(\\) comes before mask"):
        c.mask(np.ones(3, np.float32), 1.0, [])
    clients, server = _shared(pki, config)
    inbox = server.inboxes()[NAMES[0]]
    with pytest.raises(SecAggError, match=r"weight must be a number in \[0, max_weight=1.0\]"):
        clients[NAMES[0]].mask(np.ones(3, np.float32), 2.0, inbox)
    with pytest.raises(SecAggError, match="non-finite entry at index 1"):
        clients[NAMES[0]].mask(np.array([0.0, np.nan, 1.0]), 1.0, inbox)
    with pytest.raises(SecAggError, match="1-D numpy float array"):
        clients[NAMES[0]].mask(np.ones((2, 2), np.float32), 1.0, inbox)
    clients[NAMES[0]].mask(np.ones(3, np.float32), 1.0, inbox)
    with pytest.raises(SecAggError, match="already masked"):
        clients[NAMES[0]].mask(np.ones(3, np.float32), 1.0, inbox)
    with pytest.raises(SecAggError, match="arrived twice"):
        clients[NAMES[1]].mask(np.ones(3, np.float32), 1.0, server.inboxes()[NAMES[1]] * 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(nodes=("a", "b"), threshold=3), r"2 <= t <= 2"),
    (dict(nodes=("a", "b", "c", "d"), threshold=2), r"t > 4/2"),
    (dict(nodes=("a", "b", "a"), threshold=2), r"names \['a'\] more than once"),
    (dict(nodes=("a",), threshold=1), "at least 2 nodes"),
    (dict(nodes=("a", "b", "c"), threshold=2, bits=16), r"bits must be one of \(32, 64\)"),
    (dict(nodes=("a", "b", "c"), threshold=2, clip=0.0), "clip must be a positive finite number"),
    (dict(nodes=("a", "b", "c"), threshold=2, max_weight=float("inf")), "max_weight must be"),
    (dict(nodes=[f"n{i}" for i in range(9)], threshold=3, neighbours=3), "neighbours must be an even integer"),
    (dict(nodes=[f"n{i}" for i in range(9)], threshold=6, neighbours=4), r"2 <= t <= 5 and t > 5/2"),
])
def test_bad_config_gets_a_clear_error(kwargs, message):
    with pytest.raises(SecAggError, match=message):
        SecAggConfig(experiment_id="e", round=0, **kwargs)


def test_config_round_trips_as_json_and_sorts_the_roster():
    config = SecAggConfig("e", 4, ("c", "a", "b"), threshold=2, clip=0.5, max_weight=30, bits=64)
    assert config.nodes == ("a", "b", "c")
    assert SecAggConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    with pytest.raises(SecAggError, match=r"unknown keys \['colour'\]"):
        SecAggConfig.from_json({**config.to_json(), "colour": 1})
    assert SecAggConfig.default_threshold(10) == 6 and SecAggConfig.default_threshold(50, neighbours=8) == 5


@pytest.mark.parametrize("bits", [32, 64])
def test_headroom_holds_at_max_clip_and_max_weight_with_all_nodes(pki, bits):
    config = SecAggConfig("exp-h", 0, tuple(NAMES), threshold=4, clip=2.0, max_weight=7.0, bits=bits)
    up = np.array([5.0, 2.0, -2.0, -9.0, 1.0], np.float32)  # beyond the clip in both directions
    vectors = {n: up.copy() for n in config.nodes}
    weights = {n: 7.0 for n in config.nodes}
    total, weight, _, _ = run_round(config, pki, vectors, weights)
    n = len(NAMES)
    assert np.allclose(total, n * 7.0 * np.array([2.0, 2.0, -2.0, -2.0, 1.0]), rtol=0, atol=config.error_bound())
    assert weight == pytest.approx(n * 7.0)
    # The largest word a node sends, times n, stays below half the ring.
    assert n * (7.0 * 2.0 * config.scale + 0.5) < 2 ** (bits - 1)


def test_words_travel_as_safetensors_and_bad_payloads_are_refused():
    words = np.arange(10, dtype=np.uint32)
    assert np.array_equal(unpack_words(pack_words(words), bits=32, length=10), words)
    from safetensors.numpy import save

    with pytest.raises(SecAggError, match="ring has 64 bits"):
        unpack_words(pack_words(words), bits=64)
    with pytest.raises(SecAggError, match="expected 11"):
        unpack_words(pack_words(words), length=11)
    with pytest.raises(SecAggError, match="uint32 or uint64"):
        unpack_words(save({"masked": np.zeros(4, np.float32)}))
    with pytest.raises(SecAggError, match="1-D"):
        unpack_words(save({"masked": np.zeros((2, 2), np.uint32)}))
    with pytest.raises(SecAggError, match=r"exactly one tensor 'masked'"):
        unpack_words(save({"masked": words, "extra": words}))
    with pytest.raises(SecAggError, match="not a valid safetensors"):
        unpack_words(b"\x00garbage")


def test_messages_are_strict_json():
    with pytest.raises(ValueError, match="extra"):
        EncryptedShare(experiment_id="e", round=0, sender="a", recipient="b", nonce="AAAA", ciphertext="AAAA", x=1)
    with pytest.raises(ValueError, match="base64"):
        AdvertisedKeys(experiment_id="e", round=0, node="a", cipher_pk="!!", mask_pk="AAAA", certificate_pem="",
                       signature="AAAA")


def test_the_aggregator_refuses_shares_it_did_not_ask_for_and_steps_out_of_order(pki):
    from voxgrid.privacy.secagg import RevealedShare

    config = SecAggConfig("exp-p", 0, tuple(NAMES[:3]), threshold=2)
    clients, server = _shared(pki, config)
    with pytest.raises(SecAggError, match="adding keys is not possible in phase 'shares'"):
        server.add_keys(clients[NAMES[0]].advertise())  # the roster is frozen once handed out
    with pytest.raises(SecAggError, match="before it masked"):
        clients[NAMES[0]].reveal(RevealRequest(experiment_id="exp-p", round=0, survivors=NAMES[:3], dropped=[]))
    inboxes = server.inboxes()
    for n in NAMES[:3]:
        server.add_masked(n, clients[n].mask(np.ones(6, np.float32), 0.5, inboxes[n]))
    with pytest.raises(SecAggError, match="routing shares is not possible in phase 'masked'"):
        server.route([])
    good = clients[NAMES[0]].reveal(server.reveal_request()) + clients[NAMES[1]].reveal(server.reveal_request())
    forged = RevealedShare(experiment_id="exp-p", round=0, sender=NAMES[0], owner=NAMES[2], kind="mask_key",
                           x=1, y=good[0].y)
    with pytest.raises(SecAggError, match=r"mask_key share of 'site-c' from 'site-a': expected self_mask"):
        server.unmask(good + [forged])
    wrong_x = good[0].model_copy(update={"x": 2})
    with pytest.raises(SecAggError, match="x is 2, not the sender's 1"):
        server.unmask([wrong_x] + good[1:])
    tampered = good[0].model_copy(update={"y": good[1].y})
    with pytest.raises(SecAggError, match="inconsistent|does not encode"):
        server.unmask([tampered] + good[1:] + clients[NAMES[2]].reveal(server.reveal_request()))
    total, weight = server.unmask(good)
    assert np.allclose(total, 1.5, atol=config.error_bound()) and weight == pytest.approx(1.5)
