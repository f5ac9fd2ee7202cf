"""
A client's profile directory: who it is, which server it talks to, and its
secrets, sealed with a passphrase.

Two files, each mode 0600 in a directory of mode 0700:

``profile.json``
    Not secret: the format version, the server URL, the Cyphr ID and the
    user id once registered.
``vault.json``
    Everything secret, as one JSON object encrypted with XChaCha20-Poly1305
    under a key derived from the passphrase by Argon2id (the salt and
    Argon2 parameters are stored beside the ciphertext): the 64-byte
    identity seed (never the recovery phrase itself), the device
    fingerprint, the session token, unused one-time prekey seeds, the
    identity keys pinned for contacts, group name keys, and the content keys
    of messages whose one-time prekey has been erased.

Writes go to a temporary file that is synced, then renamed over the old
one, so a crash leaves either the old or the new vault, never half of one.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from nacl import pwhash
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as NaclCryptoError
from zxcvbn import zxcvbn

from cyphr.client.crypto import b64, unb64

FORMAT = 1
PROFILE_FILE = "profile.json"
VAULT_FILE = "vault.json"
# Argon2id: 3 passes over 64 MiB (the RFC 9106 second recommendation).
OPSLIMIT = 3
MEMLIMIT = 64 * 1024 * 1024
_VAULT_AAD = b"cyphr-client-vault-v1"
# The floor for a new profile's passphrase: a stolen vault falls to
# guessing if the passphrase is weak, whatever Argon2 costs (crypto review
# F13). zxcvbn's score 3 is "safely unguessable: moderate protection from
# offline slow-hash scenario".
MIN_PASSPHRASE_LENGTH = 12
MIN_PASSPHRASE_SCORE = 3
# zxcvbn refuses longer input (its matching grows quickly with length); the
# score of the first 72 characters is a lower bound for the whole.
_ZXCVBN_MAX_LENGTH = 72


class ProfileError(Exception):
    """A profile that is missing, locked with another passphrase, or damaged."""


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def check_passphrase(passphrase: str, user_inputs: list[str] | None = None) -> None:
    """ProfileError, saying why, unless ``passphrase`` is good enough to
    seal a new profile: at least 12 characters and a zxcvbn score of at
    least 3. ``user_inputs`` are words a guesser would try first (a Cyphr
    ID, a name)."""
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise ProfileError(f"the passphrase is too short: at least {MIN_PASSPHRASE_LENGTH} "
                           f"characters (a few uncommon words make a good one)")
    estimate = zxcvbn(passphrase[:_ZXCVBN_MAX_LENGTH], user_inputs=user_inputs or [],
                      max_length=_ZXCVBN_MAX_LENGTH)
    if estimate["score"] < MIN_PASSPHRASE_SCORE:
        feedback = estimate.get("feedback") or {}
        why = " ".join(filter(None, [feedback.get("warning"), *feedback.get("suggestions", [])]))
        raise ProfileError("the passphrase is too easy to guess"
                           + (f": {why}" if why else "; add another word or two"))


def _derive(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return pwhash.argon2id.kdf(32, passphrase.encode("utf-8"), salt,
                               opslimit=opslimit, memlimit=memlimit)


class Profile:
    """An unlocked profile. ``settings`` holds profile.json; ``vault`` the
    decrypted secrets; ``save()`` writes both back. Safe to share between
    threads (the Socket.IO client calls back on its own)."""

    def __init__(self, directory: Path, settings: dict[str, Any], vault: dict[str, Any],
                 key: bytes, salt: bytes, opslimit: int = OPSLIMIT,
                 memlimit: int = MEMLIMIT) -> None:
        self.directory = directory
        self.settings = settings
        self.vault = vault
        self.lock = threading.RLock()
        self._key = key
        self._salt = salt
        self._opslimit = opslimit
        self._memlimit = memlimit

    @classmethod
    def exists(cls, directory: Path | str) -> bool:
        return (Path(directory) / VAULT_FILE).exists()

    @classmethod
    def create(cls, directory: Path | str, passphrase: str, settings: dict[str, Any],
               vault: dict[str, Any]) -> Profile:
        """A new profile sealed with ``passphrase``, which must pass
        ``check_passphrase`` (opening an existing profile does not ask it
        again)."""
        directory = Path(directory)
        check_passphrase(passphrase)
        if cls.exists(directory):
            raise ProfileError(f"{directory} already holds a profile")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        salt = os.urandom(pwhash.argon2id.SALTBYTES)
        profile = cls(directory, dict(settings, format=FORMAT), vault,
                      _derive(passphrase, salt, OPSLIMIT, MEMLIMIT), salt)
        profile.save()
        return profile

    @classmethod
    def open(cls, directory: Path | str, passphrase: str) -> Profile:
        directory = Path(directory)
        try:
            settings = json.loads((directory / PROFILE_FILE).read_text("utf-8"))
            sealed = json.loads((directory / VAULT_FILE).read_text("utf-8"))
        except FileNotFoundError:
            raise ProfileError(f"no profile in {directory} (run `cyphr-client init` or "
                               f"`cyphr-client recover` first)") from None
        except (OSError, ValueError) as e:
            raise ProfileError(f"the profile in {directory} cannot be read: {e}") from None
        if not isinstance(sealed, dict) or sealed.get("format") != FORMAT or sealed.get("kdf") != "argon2id":
            raise ProfileError(f"the vault in {directory} is of an unknown format")
        try:
            salt = unb64(sealed["salt"], "salt")
            opslimit, memlimit = int(sealed["opslimit"]), int(sealed["memlimit"])
            nonce = unb64(sealed["nonce"], "nonce", 24)
            ciphertext = unb64(sealed["ciphertext"], "ciphertext")
        except (KeyError, TypeError, ValueError):
            raise ProfileError(f"the vault in {directory} is damaged") from None
        key = _derive(passphrase, salt, opslimit, memlimit)
        try:
            plaintext = crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, _VAULT_AAD, nonce, key)
        except NaclCryptoError:
            raise ProfileError("wrong passphrase (or a damaged vault)") from None
        return cls(directory, settings, json.loads(plaintext), key, salt, opslimit, memlimit)

    def save(self) -> None:
        with self.lock:
            nonce = os.urandom(24)
            plaintext = json.dumps(self.vault, sort_keys=True).encode("utf-8")
            sealed = {
                "format": FORMAT,
                "kdf": "argon2id",
                "salt": b64(self._salt),
                "opslimit": self._opslimit,
                "memlimit": self._memlimit,
                "cipher": "xchacha20poly1305",
                "nonce": b64(nonce),
                "ciphertext": b64(crypto_aead_xchacha20poly1305_ietf_encrypt(
                    plaintext, _VAULT_AAD, nonce, self._key)),
            }
            _write_private(self.directory / VAULT_FILE, json.dumps(sealed, indent=1).encode("utf-8"))
            _write_private(self.directory / PROFILE_FILE,
                           json.dumps(self.settings, indent=1, sort_keys=True).encode("utf-8"))
