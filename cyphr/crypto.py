"""
The few checks the server makes on public key material. The server never
holds a private key: it verifies signatures made by clients and checks that
the keys they publish are well formed.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PublicKey
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
MLKEM1024_KEY_BYTES = 1568
# What a v1 kyberKeySignature signs: this prefix, then the raw ML-KEM key.
# Accepted only under accept_v1_auth; v2 signatures are signing.KeyBinding.
KYBER_KEY_CONTEXT = b"cyphr-kyber-key:"


def verify_ed25519(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(public_key) != ED25519_KEY_BYTES or len(signature) != ED25519_SIGNATURE_BYTES:
        return False
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def is_mlkem1024_key(key: bytes) -> bool:
    """A valid ML-KEM-1024 encapsulation key: the right length, and every
    coefficient below the modulus (the FIPS 203 input check)."""
    if len(key) != MLKEM1024_KEY_BYTES:
        return False
    try:
        MLKEM1024PublicKey.from_public_bytes(key)
    except ValueError:
        return False
    return True


def verify_kyber_key_signature(identity_key: bytes, kyber_key: bytes, signature: bytes) -> bool:
    return verify_ed25519(identity_key, KYBER_KEY_CONTEXT + kyber_key, signature)


def fingerprint_hash(server_key: bytes, fingerprint: str) -> str:
    """What is stored in place of a device fingerprint: a keyed hash, so the
    table alone does not tell which device is whose."""
    return hmac.new(server_key, fingerprint.encode("ascii"), hashlib.sha256).hexdigest()
