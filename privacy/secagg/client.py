"""A node's side of one round of secure aggregation (pure: no networking, no files).

advertise -> share_keys -> mask -> reveal, each at most once (a repeated reveal must ask for
the same kinds as before). Masking twice with the same masks would let the aggregator subtract
two updates, so :meth:`SecAggClient.mask` refuses a second call.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import masks, shamir, shares
from .config import SecAggConfig
from .errors import SecAggError
from .keys import (check_roster, load_ca, pair_seed, public_bytes, self_mask_key, share_key, sign_keys,
                   verify_keys)
from .messages import AdvertisedKeys, EncryptedShare, RevealedShare, RevealRequest, b64d
from .quantize import Quantiser, check_vector, check_weight, ring_dtype, weight_word


class SecAggClient:
    """One node in one round: fresh X25519 keys, Shamir shares of its secrets, the masked update."""

    def __init__(self, config: SecAggConfig, me: str, identity_key, certificate_pem: bytes, ca_pem: bytes):
        if not isinstance(config, SecAggConfig):
            raise SecAggError(f"config must be a SecAggConfig, not {type(config).__name__}")
        self.config, self.me = config, me
        self._group = set(config.neighbours_of(me)) | {me}  # also checks me is in the roster
        self._identity, self._certificate = identity_key, bytes(certificate_pem)
        self._ca = load_ca(bytes(ca_pem))
        self._cipher_sk = X25519PrivateKey.generate()
        self._mask_sk = X25519PrivateKey.generate()
        self._seed = os.urandom(32)  # the self-mask seed b
        self._advert: AdvertisedKeys | None = None
        self._keys: dict[str, AdvertisedKeys] = {}  # verified keys of my neighbours
        self._held: dict[str, tuple[int, int]] = {}  # owner -> (self-mask y, mask-key y) I hold, mine included
        self._masked = False
        self._revealed: dict[str, str] = {}  # owner -> kind already revealed

    def _where(self) -> str:
        return f"node {self.me!r} (experiment {self.config.experiment_id!r}, round {self.config.round})"

    def advertise(self) -> AdvertisedKeys:
        """This round's public keys, signed with the node's certificate key (the same every call)."""
        if self._advert is None:
            c = self.config
            advert = sign_keys(self._identity, self._certificate, c.experiment_id, c.round, self.me,
                               public_bytes(self._cipher_sk), public_bytes(self._mask_sk))
            verify_keys(advert, self._ca, c.experiment_id, c.round)  # a wrong certificate fails here, not later
            self._advert = advert
        return self._advert

    def share_keys(self, roster: list[AdvertisedKeys]) -> list[EncryptedShare]:
        """Verify the neighbours' keys in ``roster`` and encrypt Shamir shares of my secrets for each."""
        c, t = self.config, self.config.threshold
        if self._advert is None:
            raise SecAggError(f"{self._where()}: advertise() comes before share_keys()")
        if self._held:
            raise SecAggError(f"{self._where()}: keys were already shared this round")
        roster = [AdvertisedKeys.model_validate(e) if isinstance(e, dict) else e for e in roster]
        check_roster(roster)
        by_node = {e.node: e for e in roster}
        unknown = sorted(set(by_node) - set(c.nodes))
        if unknown:
            raise SecAggError(f"{self._where()}: the roster names nodes outside this round: {unknown}")
        if by_node.get(self.me) != self._advert:
            raise SecAggError(f"{self._where()}: the roster does not carry the keys this node advertised")
        neighbours = {n: e for n, e in by_node.items() if n in self._group and n != self.me}
        for entry in neighbours.values():
            verify_keys(entry, self._ca, c.experiment_id, c.round)
        if len(neighbours) + 1 < t:
            raise SecAggError(f"{self._where()}: only {len(neighbours) + 1} of threshold {t} nodes of its group "
                              "advertised keys")
        holders = sorted(neighbours) + [self.me]
        xs = [c.index(h) for h in holders]
        seed_shares = shamir.split(self._seed, xs, t)
        key_shares = shamir.split(self._mask_sk.private_bytes_raw(), xs, t)
        out = []
        for holder, x in zip(holders, xs, strict=True):
            if holder == self.me:
                self._held[self.me] = (seed_shares[x], key_shares[x])
                continue
            key = share_key(self._cipher_sk, b64d(neighbours[holder].cipher_pk), c.experiment_id, c.round,
                            self.me, holder)
            out.append(shares.seal(key, c.experiment_id, c.round, self.me, holder, x, seed_shares[x], key_shares[x]))
        self._keys = neighbours
        return out

    def mask(self, vector: np.ndarray, weight: float, inbox: list[EncryptedShare]) -> np.ndarray:
        """The masked ring words of ``weight * clip(vector)`` with the weight appended (length len+1).

        ``inbox`` holds the shares addressed to this node; it masks pairwise with exactly their senders.
        """
        c = self.config
        if not self._held:
            raise SecAggError(f"{self._where()}: share_keys() comes before mask()")
        if self._masked:
            raise SecAggError(f"{self._where()}: an update was already masked this round (masking twice would "
                              "let the aggregator subtract the two)")
        vector, weight = check_vector(vector), check_weight(c, weight)
        received: dict[str, tuple[int, int]] = {}
        for share in inbox:
            share = EncryptedShare.model_validate(share) if isinstance(share, dict) else share
            who = f"{self._where()}: share from {share.sender!r}"
            if share.recipient != self.me:
                raise SecAggError(f"{who} is addressed to {share.recipient!r}")
            if share.experiment_id != c.experiment_id or share.round != c.round:
                raise SecAggError(f"{who} is for experiment {share.experiment_id!r} round {share.round} (replayed?)")
            if share.sender not in self._keys:
                raise SecAggError(f"{who}: sender is not a neighbour with verified keys")
            if share.sender in received:
                raise SecAggError(f"{who} arrived twice")
            key = share_key(self._cipher_sk, b64d(self._keys[share.sender].cipher_pk), c.experiment_id, c.round,
                            self.me, share.sender)
            received[share.sender] = shares.open_(key, share, c.experiment_id, c.round, self.me, c.index(self.me))
        if len(received) + 1 < c.threshold:
            raise SecAggError(f"{self._where()}: only {len(received) + 1} of threshold {c.threshold} nodes of its "
                              "group shared keys")
        streams = [masks.Stream(self_mask_key(self._seed, c.experiment_id, c.round, self.me), 1)]
        for other in sorted(received):
            seed = pair_seed(self._mask_sk, b64d(self._keys[other].mask_pk), c.experiment_id, c.round, self.me, other)
            streams.append(masks.Stream(seed, 1 if self.me < other else -1))
        words = np.empty(vector.size + 1, ring_dtype(c.bits))
        words[-1] = weight_word(c, weight)
        masks.apply(words, streams, head=(vector, Quantiser(c, weight, masks.CHUNK)))
        self._held.update(received)
        self._masked = True
        return words

    def reveal(self, request: RevealRequest) -> list[RevealedShare]:
        """Shares of survivors' self-mask seeds and dropped nodes' mask keys; never both for one node."""
        c = self.config
        request = RevealRequest.model_validate(request) if isinstance(request, dict) else request
        where = self._where()
        if not self._masked:
            raise SecAggError(f"{where}: asked to reveal shares before it masked its update")
        if request.experiment_id != c.experiment_id or request.round != c.round:
            raise SecAggError(f"{where}: reveal request is for experiment {request.experiment_id!r} round "
                              f"{request.round}")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise SecAggError(f"{where}: reveal request names a node twice")
        both = sorted(survivors & dropped)
        if both:
            raise SecAggError(f"{where}: refused to reveal both kinds of share (self-mask and mask key) for "
                              f"node(s) {both}")
        outside = sorted((survivors | dropped) - self._group)
        if outside:
            raise SecAggError(f"{where}: reveal request asks about node(s) {outside} outside its neighbour set "
                              "(the aggregator must ask with SecAggServer.reveal_request(node))")
        if self.me not in survivors:
            raise SecAggError(f"{where}: reveal request does not list this node among the survivors")
        if len(survivors) < c.threshold:
            raise SecAggError(f"{where}: refused to reveal with only {len(survivors)} survivors of threshold "
                              f"{c.threshold}")
        kinds = {o: "self_mask" for o in survivors} | {o: "mask_key" for o in dropped}
        conflicts = sorted(o for o, k in kinds.items() if self._revealed.get(o, k) != k)
        if conflicts:
            raise SecAggError(f"{where}: refused to reveal both kinds of share for node(s) {conflicts} "
                              "(the other kind was revealed earlier)")
        out = []
        for owner in sorted(kinds):
            if owner not in self._held:
                continue  # it never shared with this node: nothing to reveal, nothing masked with it
            y = self._held[owner][0 if kinds[owner] == "self_mask" else 1]
            out.append(RevealedShare(experiment_id=c.experiment_id, round=c.round, sender=self.me, owner=owner,
                                     kind=kinds[owner], x=c.index(self.me), y=shamir.encode_y(y)))
            self._revealed[owner] = kinds[owner]
        return out
