"""Per-round keys: X25519 pairs, their signed advertisement, and every key derived from them.

All derived keys come from HKDF-SHA256 whose ``info`` binds the purpose, experiment, round and
the (sorted) pair, so a secret from one round, experiment or pair is useless in any other.
"""

from __future__ import annotations

import datetime as dt
import json

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from .errors import SecAggError
from .messages import AdvertisedKeys, b64d, b64e

PROTOCOL = "voxgrid-secagg/v1"


def canonical(*parts: object) -> bytes:
    """An unambiguous byte encoding of a statement (JSON array, fixed separators)."""
    return json.dumps([PROTOCOL, *parts], separators=(",", ":"), ensure_ascii=True).encode()


def derive(secret: bytes, *info: object) -> bytes:
    """32 bytes from ``secret`` for the purpose and context named in ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=canonical(*info)).derive(secret)


def pair_seed(my_mask_sk: X25519PrivateKey, their_mask_pk: bytes, experiment_id: str, round_: int,
              a: str, b: str) -> bytes:
    """The pairwise mask seed of nodes ``a`` and ``b`` (same on both sides)."""
    shared = my_mask_sk.exchange(X25519PublicKey.from_public_bytes(their_mask_pk))
    return derive(shared, "pair-mask", experiment_id, round_, *sorted((a, b)))


def share_key(my_cipher_sk: X25519PrivateKey, their_cipher_pk: bytes, experiment_id: str, round_: int,
              a: str, b: str) -> bytes:
    """The AEAD key for shares exchanged between ``a`` and ``b``."""
    shared = my_cipher_sk.exchange(X25519PublicKey.from_public_bytes(their_cipher_pk))
    return derive(shared, "share-encryption", experiment_id, round_, *sorted((a, b)))


def self_mask_key(seed: bytes, experiment_id: str, round_: int, node: str) -> bytes:
    return derive(seed, "self-mask", experiment_id, round_, node)


def _statement(experiment_id: str, round_: int, node: str, cipher_pk: str, mask_pk: str) -> bytes:
    return canonical("advertise", experiment_id, round_, node, cipher_pk, mask_pk)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def sign_keys(identity_key: ec.EllipticCurvePrivateKey, certificate_pem: bytes, experiment_id: str, round_: int,
              node: str, cipher_pk: bytes, mask_pk: bytes) -> AdvertisedKeys:
    if not isinstance(identity_key, ec.EllipticCurvePrivateKey):
        raise SecAggError(f"node {node!r}: the identity key must be an EC private key (the node's TLS key)")
    c, m = b64e(cipher_pk), b64e(mask_pk)
    signature = identity_key.sign(_statement(experiment_id, round_, node, c, m), ec.ECDSA(hashes.SHA256()))
    return AdvertisedKeys(node=node, experiment_id=experiment_id, round=round_, cipher_pk=c, mask_pk=m,
                          certificate_pem=certificate_pem.decode("ascii"), signature=b64e(signature))


def load_ca(ca_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(ca_pem)
    except ValueError as e:
        raise SecAggError(f"the federation CA certificate is not valid PEM: {e}") from None


def verify_keys(keys: AdvertisedKeys, ca: x509.Certificate, experiment_id: str, round_: int) -> None:
    """Refuse (SecAggError naming the node and reason) keys not signed by that node for this round."""
    who = f"keys of node {keys.node!r}"
    if keys.experiment_id != experiment_id or keys.round != round_:
        raise SecAggError(f"{who} are for experiment {keys.experiment_id!r} round {keys.round}, "
                          f"not {experiment_id!r} round {round_} (replayed?)")
    for field in ("cipher_pk", "mask_pk"):
        if len(b64d(getattr(keys, field))) != 32:
            raise SecAggError(f"{who}: {field} is not a 32-byte X25519 public key")
    if keys.cipher_pk == keys.mask_pk:
        raise SecAggError(f"{who}: the cipher and mask public keys must differ")
    try:
        cert = x509.load_pem_x509_certificate(keys.certificate_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise SecAggError(f"{who}: certificate is not valid PEM: {e}") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise SecAggError(f"{who}: certificate was not issued by the federation CA") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != keys.node:
        cn = names[0].value if names else None
        raise SecAggError(f"{who} are signed with the certificate of {cn!r}, not of {keys.node!r}")
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SecAggError(f"{who}: certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} "
                          f"to {cert.not_valid_after_utc:%Y-%m-%d})")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise SecAggError(f"{who}: certificate key is not EC P-256")
    statement = _statement(keys.experiment_id, keys.round, keys.node, keys.cipher_pk, keys.mask_pk)
    try:
        public.verify(b64d(keys.signature), statement, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SecAggError(f"{who}: signature does not match the keys (swapped or re-signed keys)") from None


def check_roster(entries: list[AdvertisedKeys]) -> None:
    """Refuse a roster naming a node twice or reusing a public key (a duplicated or replayed key)."""
    seen_nodes: set[str] = set()
    seen_keys: dict[str, str] = {}
    for e in entries:
        if e.node in seen_nodes:
            raise SecAggError(f"keys of node {e.node!r} appear twice in the roster")
        seen_nodes.add(e.node)
        for pk in (e.cipher_pk, e.mask_pk):
            if pk in seen_keys:
                raise SecAggError(f"keys of node {e.node!r} reuse a public key already advertised by "
                                  f"{seen_keys[pk]!r} (duplicated or replayed key)")
            seen_keys[pk] = e.node
