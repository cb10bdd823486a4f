"""Encrypting one sender's Shamir shares for one recipient (ChaCha20-Poly1305).

The key comes from the pair's X25519 agreement on their cipher keys; the associated data binds
experiment, round, sender and recipient, so a share relayed to another node, or replayed into
another round or experiment, fails authentication instead of decrypting.
"""

from __future__ import annotations

import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from . import shamir
from .errors import SecAggError
from .keys import canonical
from .messages import EncryptedShare, b64d, b64e


def _aad(experiment_id: str, round_: int, sender: str, recipient: str) -> bytes:
    return canonical("share", experiment_id, round_, sender, recipient)


def seal(key: bytes, experiment_id: str, round_: int, sender: str, recipient: str, x: int,
         self_mask_y: int, mask_key_y: int) -> EncryptedShare:
    plaintext = json.dumps({"x": x, "self_mask": shamir.encode_y(self_mask_y),
                            "mask_key": shamir.encode_y(mask_key_y)}, separators=(",", ":")).encode()
    nonce = os.urandom(12)
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, plaintext, _aad(experiment_id, round_, sender, recipient))
    return EncryptedShare(experiment_id=experiment_id, round=round_, sender=sender, recipient=recipient,
                          nonce=b64e(nonce), ciphertext=b64e(ciphertext))


def open_(key: bytes, share: EncryptedShare, experiment_id: str, round_: int, recipient: str,
          expected_x: int) -> tuple[int, int]:
    """(self-mask share y, mask-key share y) from ``share``, authenticated for this round and recipient."""
    what = f"share from node {share.sender!r}"
    nonce = b64d(share.nonce)
    if len(nonce) != 12:
        raise SecAggError(f"{what}: nonce must be 12 bytes")
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(
            nonce, b64d(share.ciphertext), _aad(experiment_id, round_, share.sender, recipient))
    except InvalidTag:
        raise SecAggError(f"{what} does not decrypt for {recipient!r} in experiment {experiment_id!r} round "
                          f"{round_} (wrong round, experiment or recipient, or tampered)") from None
    try:
        body = json.loads(plaintext)
        ok = isinstance(body, dict) and set(body) == {"x", "self_mask", "mask_key"} and body["x"] == expected_x
    except ValueError:
        ok = False
    if not ok:
        raise SecAggError(f"{what}: malformed share contents")
    return shamir.decode_y(body["self_mask"], what), shamir.decode_y(body["mask_key"], what)
