"""
The checks of an uploaded ML-KEM public key (a main key, a one-time
prekey or a device key) and its signature by the identity key.

Version 2 (``signing.KeyBinding``) binds the key's kind (the label:
ml-kem-key or one-time-prekey), its owner's Cyphr ID, its id and its
validity, so a signature made for one can never pass for another. Version 1
(Ed25519 over ``"cyphr-kyber-key:" || key``) binds nothing but the key and is
accepted only under ``accept_v1_auth``.

A device key (``signing.DeviceKeyBinding``, label device-key) also binds
the device's id; it has no version 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cyphr.crypto import is_mlkem1024_key, verify_kyber_key_signature
from cyphr.errors import (
    INVALID_FIELD,
    INVALID_KEY_SIGNATURE,
    INVALID_KYBER_KEY,
    KEY_EXPIRED,
    UNSUPPORTED_SIGNATURE_VERSION,
    BadRequest,
)
from cyphr.signing import DeviceKeyBinding, KeyBinding

# A client's clock may run this far ahead of the server's.
MAX_CLOCK_AHEAD_MS = 5 * 60 * 1000
# The longest validity a key may claim: the reference client gives main
# keys 180 days and prekeys 90; a key valid for years is a key never rotated.
MAX_VALIDITY_MS = 400 * 24 * 3600 * 1000


class UploadedKey(Protocol):
    kyber_public_key: bytes
    signature: bytes
    created_at: int | None
    expires_at: int | None

    @property
    def signature_version(self) -> int: ...


@dataclass(frozen=True)
class KeyFields:
    """The names of an uploaded key's fields, for the errors' details."""

    key: str
    created_at: str
    expires_at: str

    @classmethod
    def main_key(cls) -> KeyFields:
        return cls("kyberPublicKey", "kyberKeyCreatedAt", "kyberKeyExpiresAt")

    @classmethod
    def device_key(cls) -> KeyFields:
        """A device key travels in the fields the single-device API gives
        the main key, so the names are the same."""
        return cls.main_key()

    @classmethod
    def prekey(cls, index: int) -> KeyFields:
        return cls(f"prekeys[{index}]", f"prekeys[{index}].createdAt", f"prekeys[{index}].expiresAt")


def check_key(key: UploadedKey, *, identity_key: bytes, owner: str, key_id: int | None,
              one_time: bool, now: int, accept_v1: bool, fields: KeyFields) -> None:
    """Refuse (BadRequest) a key whose signature version is not accepted,
    whose validity is not now or not plausible, that is not a valid
    ML-KEM-1024 key, or whose signature does not bind it, as this kind of
    key, to ``owner`` and ``key_id`` with its validity."""
    if key.signature_version == 1:
        if not accept_v1:
            raise BadRequest(
                "v1 key signatures (over \"cyphr-kyber-key:\" and the key) are not accepted; "
                "update the client", code=UNSUPPORTED_SIGNATURE_VERSION,
                details={"field": fields.key})
    else:
        assert key.created_at is not None and key.expires_at is not None
        check_validity(key.created_at, key.expires_at, now, fields)
    if not is_mlkem1024_key(key.kyber_public_key):
        raise BadRequest(f"{fields.key} is not a valid ML-KEM-1024 public key",
                         code=INVALID_KYBER_KEY, details={"field": fields.key})
    if key.signature_version == 1:
        valid = verify_kyber_key_signature(identity_key, key.kyber_public_key, key.signature)
    else:
        assert key_id is not None and key.created_at is not None and key.expires_at is not None
        binding = KeyBinding(one_time=one_time, owner=owner, key_id=key_id,
                             created_at=key.created_at, expires_at=key.expires_at,
                             public_key=key.kyber_public_key)
        valid = binding.verify(identity_key, key.signature)
    if not valid:
        raise BadRequest("The key signature does not verify with the identity key for this key, "
                         "its kind, owner, id and validity",
                         code=INVALID_KEY_SIGNATURE, details={"field": fields.key})


def check_device_key(key: UploadedKey, *, identity_key: bytes, owner: str, device_id: int,
                     key_id: int, now: int, fields: KeyFields) -> None:
    """Refuse (BadRequest) a device key that carries no validity (a v1
    signature is never accepted for a device key), whose validity is not
    now or not plausible, that is not a valid ML-KEM-1024 key, or whose
    signature does not bind it, as a device key, to ``owner``,
    ``device_id`` and ``key_id`` with its validity. A ``device_id`` below
    1 can have no valid signature: the caller checks the field itself if it
    wants a more precise error."""
    if key.signature_version == 1 or key.created_at is None or key.expires_at is None:
        raise BadRequest("A device key is signed as a cyphr-v2 device-key, with its creation "
                         "and expiry times; v1 key signatures are not accepted for it",
                         code=UNSUPPORTED_SIGNATURE_VERSION, details={"field": fields.key})
    check_validity(key.created_at, key.expires_at, now, fields)
    if not is_mlkem1024_key(key.kyber_public_key):
        raise BadRequest(f"{fields.key} is not a valid ML-KEM-1024 public key",
                         code=INVALID_KYBER_KEY, details={"field": fields.key})
    binding = DeviceKeyBinding(owner=owner, device_id=device_id, key_id=key_id,
                               created_at=key.created_at, expires_at=key.expires_at,
                               public_key=key.kyber_public_key)
    if not binding.verify(identity_key, key.signature):
        raise BadRequest("The device key signature does not verify with the identity key for "
                         "this key, its owner, device id, key id and validity",
                         code=INVALID_KEY_SIGNATURE, details={"field": fields.key})


def check_validity(created_at: int, expires_at: int, now: int, fields: KeyFields) -> None:
    if expires_at <= created_at:
        raise BadRequest(f"{fields.expires_at} must be later than {fields.created_at}",
                         code=INVALID_FIELD, details={"field": fields.expires_at})
    if expires_at - created_at > MAX_VALIDITY_MS:
        raise BadRequest("A key may be valid for at most 400 days",
                         code=INVALID_FIELD, details={"field": fields.expires_at})
    if created_at > now + MAX_CLOCK_AHEAD_MS:
        raise BadRequest(f"{fields.created_at} is more than 5 minutes in the future",
                         code=INVALID_FIELD, details={"field": fields.created_at})
    if expires_at <= now:
        raise BadRequest("The key has expired", code=KEY_EXPIRED,
                         details={"field": fields.expires_at})
