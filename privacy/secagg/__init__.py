"""Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+ sparse graphs, Bell et al. 2020): the pure core.

The aggregator relays and sums; it learns only the weighted sum of the updates and the total
weight, even when up to ``n - threshold`` nodes drop out. Modules: :mod:`.config` (round
parameters, neighbour graph, quantisation scales), :mod:`.keys` (signed X25519 keys, HKDF),
:mod:`.shamir`, :mod:`.shares` (AEAD-encrypted shares), :mod:`.quantize`, :mod:`.masks`
(ChaCha20 mask expansion), :mod:`.messages` (wire models), :mod:`.words` (safetensors packing),
:mod:`.client` (a node) and :mod:`.server` (the aggregator).

One round (every message is a pydantic model; masked words travel via :func:`pack_words`)::

    config = SecAggConfig(experiment_id, round, nodes, threshold=SecAggConfig.default_threshold(len(nodes)),
                          clip=..., max_weight=...)            # sent to every node as config.to_json()
    server = SecAggServer(config, ca_pem=ca_pem)
    server.add_keys(client.advertise())                       # each node; then
    roster = server.roster()                                  # freezes the key phase
    server.route(client.share_keys(roster))                   # each node; then
    inbox = server.inboxes()[node]
    server.add_masked(node, client.mask(vector, weight, inbox))
    shares = client.reveal(server.reveal_request(node))       # each survivor
    total, total_weight = server.unmask(all_shares)           # the weighted mean is total / total_weight
"""

from .client import SecAggClient
from .config import SecAggConfig
from .errors import SecAggError
from .messages import AdvertisedKeys, EncryptedShare, RevealedShare, RevealRequest
from .server import SecAggServer
from .words import pack_words, unpack_words

__all__ = ["AdvertisedKeys", "EncryptedShare", "RevealRequest", "RevealedShare", "SecAggClient", "SecAggConfig",
           "SecAggError", "SecAggServer", "pack_words", "unpack_words"]
