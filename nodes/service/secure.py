"""Secure aggregation at the node: per-round key material, and masking of released updates.

The protocol is :mod:`voxgrid.privacy.secagg`; this module binds it to the node: the node's
long-term identity is its TLS key (the certificate the federation CA issued for its name), round
secrets live in memory only (a restarted node drops out of the round, which the protocol
tolerates), and an update that an experiment asked to aggregate securely leaves only masked.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key

from voxgrid import tensors
from voxgrid.privacy.mechanisms import distributed_share
from voxgrid.privacy.secagg import SecAggClient, SecAggConfig, SecAggError, pack_words
from voxgrid.wire import (AdvertisedKeys, EncryptedShare, JobRequest, Metrics, RevealedShare, RevealRequest, SecAggKeysRequest,
                          SecAggSharesRequest, SecureAggregation)

#: Rounds whose secrets a node keeps per scientist; that scientist's oldest go first.
KEEP_ROUNDS = 64
#: Masked updates kept per scientist for retries (each is as large as the model).
KEEP_MASKED = 8


class SecureAggregationRefused(ValueError):
    """A secure-aggregation request the node will not serve; the message says why."""


def parse_config(secure: SecureAggregation, node: str, experiment_id: str | None = None,
                 round: int | None = None) -> SecAggConfig:
    """The round's config, checked against this node and (when given) the job it belongs to."""
    try:
        config = SecAggConfig.from_json(secure.config)
    except (SecAggError, ValueError, TypeError, KeyError) as exc:
        raise SecureAggregationRefused(f"invalid secure aggregation config: {exc}") from None
    if node not in config.nodes:
        raise SecureAggregationRefused(f"node {node!r} is not in the secure aggregation roster {list(config.nodes)}")
    if experiment_id is not None and (config.experiment_id, config.round) != (experiment_id, round):
        raise SecureAggregationRefused(
            f"the secure aggregation config is for experiment {config.experiment_id!r} round {config.round}, "
            f"the job for experiment {experiment_id!r} round {round}")
    return config


def update_weight(secure: SecureAggregation, metrics: Metrics, config: SecAggConfig) -> float:
    """What the node scales its update by before masking (the strategy's weighting rule)."""
    if secure.weight == "samples":
        weight = float(metrics.samples)
    else:  # val_dice: a site that reported none contributes nothing
        d = metrics.mean_dice
        weight = min(max(float(d), 0.0), 1.0) if d is not None and math.isfinite(d) else 0.0
    if weight > config.max_weight:
        raise SecureAggregationRefused(f"this update's weight {weight:g} ({secure.weight}) exceeds the round's "
                                       f"max_weight {config.max_weight:g}")
    return weight


def noise_share(req: JobRequest, metrics: Metrics) -> float | None:
    """This job's share of a distributed Gaussian filter's noise (None: not a secure job)."""
    if req.secure is None:
        return None
    config = SecAggConfig.from_json(req.secure.config)
    return distributed_share(update_weight(req.secure, metrics, config), config.max_weight, config.threshold)


class NodeSecAgg:
    """One node's side of every secure sum it takes part in, keyed by (scientist, experiment, round)."""

    def __init__(self, name: str, tls_dir: Path):
        self.name = name
        self._tls = tls_dir
        self._lock = threading.Lock()
        self._rounds: OrderedDict[tuple[str, str, int], SecAggClient] = OrderedDict()
        self._masked: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # (scientist, job) -> masked words

    def _identity(self):
        # Read at each round, so a rotated certificate is used from the next round on.
        key = load_pem_private_key((self._tls / "server.key").read_bytes(), password=None)
        return key, (self._tls / "server.crt").read_bytes(), (self._tls / "ca.crt").read_bytes()

    def keys(self, scientist: str, req: SecAggKeysRequest) -> AdvertisedKeys:
        config = parse_config(req.secure, self.name)
        slot = (scientist, config.experiment_id, config.round)
        with self._lock:
            client = self._rounds.get(slot)
            if client is not None:
                if client.config != config:
                    raise SecureAggregationRefused(f"round {config.round} of {config.experiment_id!r} already has "
                                                   "keys for another configuration; start a new round")
                return client.advertise()  # a retry after a lost answer: the same keys
            key, cert, ca = self._identity()
            client = SecAggClient(config, self.name, key, cert, ca)
            self._rounds[slot] = client
            _keep_recent(self._rounds, scientist, KEEP_ROUNDS)
            return client.advertise()

    def _client(self, scientist: str, experiment_id: str, round: int) -> SecAggClient:
        client = self._rounds.get((scientist, experiment_id, round))
        if client is None:
            raise SecureAggregationRefused(
                f"node {self.name!r} has no secure aggregation keys for experiment {experiment_id!r} round {round} "
                "(never made, or lost when the node restarted): that round goes on without this node")
        return client

    def shares(self, scientist: str, req: SecAggSharesRequest) -> list[EncryptedShare]:
        return self._client(scientist, req.experiment_id, req.round).share_keys(req.roster)

    def mask(self, scientist: str, job_id: str, secure: SecureAggregation, metrics: Metrics, update: bytes,
             inbox: list[EncryptedShare]) -> bytes:
        """The job's update (already through the privacy filter chain), weighted, quantised and masked."""
        with self._lock:
            if (scientist, job_id) in self._masked:
                return self._masked[(scientist, job_id)]
        config = parse_config(secure, self.name)
        client = self._client(scientist, config.experiment_id, config.round)
        vector = tensors.flatten(tensors.loads(update))
        words = pack_words(client.mask(vector, update_weight(secure, metrics, config), inbox))
        with self._lock:
            self._masked[(scientist, job_id)] = words
            _keep_recent(self._masked, scientist, KEEP_MASKED)
        return words

    def reveal(self, scientist: str, req: RevealRequest) -> list[RevealedShare]:
        return self._client(scientist, req.experiment_id, req.round).reveal(req)


def _keep_recent(items: OrderedDict, scientist: str, keep: int) -> None:
    """Drop ``scientist``'s oldest entries past ``keep``: one scientist's rounds never evict another's."""
    mine = [k for k in items if k[0] == scientist]
    for k in mine[:-keep] if len(mine) > keep else ():
        del items[k]
