"""The aggregator's side of one round: relay keys and shares, sum masked words, remove the masks.

It learns only the sum: it holds every node's masked words but only the self-mask seeds of nodes
whose input it summed and the mask keys of nodes whose input it did not. Phases only move forward
(keys -> shares -> masked -> reveal -> done): the roster freezes at :meth:`roster`, the set of
masked inputs at :meth:`reveal_request` (a late input from a node declared dropped is refused,
since its mask key is about to be revealed).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import masks, shamir
from .config import SecAggConfig
from .errors import SecAggError
from .keys import check_roster, load_ca, pair_seed, public_bytes, self_mask_key, verify_keys
from .messages import AdvertisedKeys, EncryptedShare, RevealedShare, RevealRequest, b64d
from .quantize import decode
from .words import check_words

class SecAggServer:
    """The relay and summer of one round (pure, in memory; one accumulator the size of an update).

    Not thread-safe: a caller that gathers masked inputs in threads adds them under one lock.
    """

    def __init__(self, config: SecAggConfig, *, ca_pem: bytes | None = None):
        if not isinstance(config, SecAggConfig):
            raise SecAggError(f"config must be a SecAggConfig, not {type(config).__name__}")
        self.config = config
        self._ca = None if ca_pem is None else load_ca(bytes(ca_pem))
        self._phase = "keys"
        self._keys: dict[str, AdvertisedKeys] = {}
        self._routed: dict[tuple[str, str], EncryptedShare] = {}  # (sender, recipient) -> share
        self._masked: list[str] = []
        self._sum: np.ndarray | None = None

    def _need(self, step: str, *phases: str) -> None:
        if self._phase not in phases:
            raise SecAggError(f"aggregator of experiment {self.config.experiment_id!r} round {self.config.round}: "
                              f"{step} is not possible in phase {self._phase!r}")

    @property
    def sharers(self) -> set[str]:
        """Nodes whose shares were routed (U2): the only nodes anyone masked with."""
        return {s for s, _ in self._routed}

    def add_keys(self, keys: AdvertisedKeys, ca_pem: bytes | None = None) -> None:
        """Admit one node's advertised keys (verified too when a CA certificate was given)."""
        self._need("adding keys", "keys")
        c = self.config
        keys = AdvertisedKeys.model_validate(keys) if isinstance(keys, dict) else keys
        if keys.node not in c.nodes:
            raise SecAggError(f"keys of node {keys.node!r}: not in this round's roster {list(c.nodes)}")
        if keys.node in self._keys:
            raise SecAggError(f"keys of node {keys.node!r} were already advertised this round")
        ca = load_ca(bytes(ca_pem)) if ca_pem is not None else self._ca
        if ca is not None:
            verify_keys(keys, ca, c.experiment_id, c.round)
        elif keys.experiment_id != c.experiment_id or keys.round != c.round:
            raise SecAggError(f"keys of node {keys.node!r} are for experiment {keys.experiment_id!r} round "
                              f"{keys.round}, not {c.experiment_id!r} round {c.round} (replayed?)")
        check_roster([*self._keys.values(), keys])
        self._keys[keys.node] = keys

    def roster(self) -> list[AdvertisedKeys]:
        """Every admitted node's keys, sorted by node; closes the key phase so all nodes see one roster."""
        self._need("the roster", "keys", "shares")
        self._phase = "shares"
        return [self._keys[n] for n in sorted(self._keys)]

    def route(self, shares: list[EncryptedShare]) -> dict[str, list[EncryptedShare]]:
        """Check and record ``shares``; returns them by recipient (see :meth:`inboxes` for all so far)."""
        self._need("routing shares", "shares")
        c = self.config
        out: dict[str, list[EncryptedShare]] = {}
        checked = []
        for share in shares:
            share = EncryptedShare.model_validate(share) if isinstance(share, dict) else share
            what = f"share from {share.sender!r} to {share.recipient!r}"
            if share.experiment_id != c.experiment_id or share.round != c.round:
                raise SecAggError(f"{what} is for experiment {share.experiment_id!r} round {share.round}")
            if share.sender not in self._keys or share.recipient not in self._keys:
                raise SecAggError(f"{what}: both nodes must be in the roster")
            if share.recipient not in c.neighbours_of(share.sender):
                raise SecAggError(f"{what}: the recipient is not the sender's neighbour")
            pair = (share.sender, share.recipient)
            if pair in self._routed or pair in {(s.sender, s.recipient) for s in checked}:
                raise SecAggError(f"{what} was already routed")
            checked.append(share)
        for share in checked:
            self._routed[(share.sender, share.recipient)] = share
            out.setdefault(share.recipient, []).append(share)
        return out

    def inboxes(self) -> dict[str, list[EncryptedShare]]:
        """Every share routed so far, by recipient."""
        out: dict[str, list[EncryptedShare]] = {}
        for (_, recipient), share in sorted(self._routed.items()):
            out.setdefault(recipient, []).append(share)
        return out

    def add_masked(self, node: str, words: np.ndarray) -> None:
        """Add one node's masked words to the running sum (wrapping ring arithmetic)."""
        self._need("adding masked input", "shares", "masked")
        if node not in self.sharers:
            raise SecAggError(f"masked input of node {node!r}: it shared no keys this round")
        if node in self._masked:
            raise SecAggError(f"masked input of node {node!r} arrived twice")
        words = check_words(words, self.config.bits, None if self._sum is None else self._sum.size)
        if self._sum is None:
            self._sum = words.astype(words.dtype.newbyteorder("="), copy=True)
        else:
            np.add(self._sum, words, out=self._sum)
        self._masked.append(node)
        self._phase = "masked"

    def _require_quorum(self) -> None:
        t, got = self.config.threshold, len(self._masked)
        if got < t:
            raise SecAggError(f"cannot unmask experiment {self.config.experiment_id!r} round {self.config.round}: "
                              f"only {got} of threshold {t} nodes sent masked input; nothing is released")

    def reveal_request(self, node: str | None = None) -> RevealRequest:
        """Survivors (sent masked input) and dropped (shared keys, sent none); with ``node``, only those
        in its group (required with a SecAgg+ graph: a node answers only about its neighbours)."""
        self._need("a reveal request", "masked", "reveal", "done")
        self._require_quorum()
        if self._phase != "done":
            self._phase = "reveal"
        c = self.config
        survivors, dropped = sorted(self._masked), sorted(self.sharers - set(self._masked))
        if node is not None:
            group = set(c.neighbours_of(node)) | {node}
            survivors, dropped = [n for n in survivors if n in group], [n for n in dropped if n in group]
        return RevealRequest(experiment_id=c.experiment_id, round=c.round, survivors=survivors, dropped=dropped)

    def _check_revealed(self, share: RevealedShare, survivors: set[str], dropped: set[str]) -> str:
        """Refuse a revealed share that is for another round, from a node that sent no masked input, of the
        wrong kind for its owner, never routed, or at another x than its sender's; returns its description."""
        c = self.config
        what = f"revealed {share.kind} share of {share.owner!r} from {share.sender!r}"
        if share.experiment_id != c.experiment_id or share.round != c.round:
            raise SecAggError(f"{what} is for experiment {share.experiment_id!r} round {share.round}")
        if share.sender not in survivors:
            raise SecAggError(f"{what}: the sender sent no masked input")
        expected = "self_mask" if share.owner in survivors else "mask_key" if share.owner in dropped else None
        if share.kind != expected:
            raise SecAggError(f"{what}: expected {expected or 'nothing'} for that node")
        if share.owner != share.sender and (share.owner, share.sender) not in self._routed:
            raise SecAggError(f"{what}: the owner never sent the sender a share")
        if share.x != c.index(share.sender):
            raise SecAggError(f"{what}: x is {share.x}, not the sender's {c.index(share.sender)}")
        return what

    def _revealed_points(self, revealed: list[RevealedShare], survivors: set[str],
                         dropped: set[str]) -> dict[tuple[str, str], dict[int, int]]:
        """(owner, kind) -> {x: y} of every checked revealed share; the same x twice must agree."""
        got: dict[tuple[str, str], dict[int, int]] = {}
        for share in revealed:
            share = RevealedShare.model_validate(share) if isinstance(share, dict) else share
            what = self._check_revealed(share, survivors, dropped)
            y = shamir.decode_y(share.y, what)
            points = got.setdefault((share.owner, share.kind), {})
            if points.get(share.x, y) != y:
                raise SecAggError(f"{what} arrived twice with different values")
            points[share.x] = y
        return got

    def _mask_streams(self, got: dict[tuple[str, str], dict[int, int]], survivors: set[str],
                      dropped: set[str]) -> list[masks.Stream]:
        """The masks to remove: each survivor's self-mask, and each dropped node's pairwise masks with the
        survivors it shared with (from its reconstructed mask key, checked against the advertised one)."""
        c = self.config
        t = c.threshold
        streams = []
        for owner in sorted(survivors):
            seed = shamir.combine(got.get((owner, "self_mask"), {}), t, f"the self-mask seed of {owner!r}")
            streams.append(masks.Stream(self_mask_key(seed, c.experiment_id, c.round, owner), -1))
        for owner in sorted(dropped):
            raw = shamir.combine(got.get((owner, "mask_key"), {}), t, f"the mask key of dropped node {owner!r}")
            key = X25519PrivateKey.from_private_bytes(raw)
            if public_bytes(key) != b64d(self._keys[owner].mask_pk):
                raise SecAggError(f"the reconstructed mask key of {owner!r} does not match its advertised key")
            for peer in sorted(survivors):
                if (owner, peer) in self._routed:  # the peer received owner's share, so it masked with owner
                    seed = pair_seed(key, b64d(self._keys[peer].mask_pk), c.experiment_id, c.round, peer, owner)
                    streams.append(masks.Stream(seed, -1 if peer < owner else 1))
        return streams

    def unmask(self, revealed: list[RevealedShare]) -> tuple[np.ndarray, float]:
        """(weighted sum as float64, total weight). Every check runs before any mask is removed, so a
        refusal (e.g. too few shares) releases nothing."""
        self._need("unmasking", "masked", "reveal")
        self._require_quorum()
        self._phase = "reveal"
        survivors, dropped = set(self._masked), self.sharers - set(self._masked)
        got = self._revealed_points(revealed, survivors, dropped)
        streams = self._mask_streams(got, survivors, dropped)
        masks.apply(self._sum, streams)
        self._phase = "done"
        return decode(self.config, self._sum)
