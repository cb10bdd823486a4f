"""What crosses the wire between nodes and the aggregator (JSON, validated by pydantic).

Binary fields are standard base64 strings; share values (``y``) are hexadecimal field elements.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _is_base64(text: str) -> str:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not standard base64") from None
    return text


B64 = Annotated[str, AfterValidator(_is_base64)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment_id: Name
    round: int = Field(ge=0)


class AdvertisedKeys(_Message):
    """A node's fresh per-round public keys, signed with its long-term (certificate) key."""

    node: Name
    cipher_pk: B64 = Field(description="X25519 public key for share encryption (32 bytes)")
    mask_pk: B64 = Field(description="X25519 public key for pairwise masks (32 bytes)")
    certificate_pem: str = Field(max_length=20_000)
    signature: B64 = Field(description="ECDSA P-256/SHA-256 over the canonical key statement")


class EncryptedShare(_Message):
    """The sender's Shamir shares (self-mask seed and mask key) for one recipient, AEAD-encrypted."""

    sender: Name
    recipient: Name
    nonce: B64
    ciphertext: B64


class RevealRequest(_Message):
    """The aggregator's request after masked inputs: self-mask shares of survivors, mask-key shares of dropped."""

    survivors: list[Name]
    dropped: list[Name]


class RevealedShare(_Message):
    """One share a survivor reveals: of ``owner``'s self-mask seed, or of a dropped owner's mask key."""

    sender: Name
    owner: Name
    kind: Literal["self_mask", "mask_key"]
    x: int = Field(ge=1)
    y: str = Field(min_length=1, max_length=200)


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
