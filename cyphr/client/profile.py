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
    identity keys pinned for contacts, group name keys, the content keys
    of messages whose one-time prekey has been erased, and on a linked
    device (cyphr.client.devices) the seed of its own ML-KEM-1024 device
    key (``deviceKey``; its device id is in profile.json).

``vault.lock``
    Empty: the inter-process lock (``flock``). Several processes may use one
    profile at once (``listen`` in one terminal, ``send`` in another). Every
    change is a read-modify-write under this lock: whoever takes it first
    re-reads the files if another process changed them, changes them, and
    writes them before letting go, so no process undoes another's change (a
    one-time prekey published, a content key kept, a pin). The operating
    system releases the lock when its process dies.

Writes go to a temporary file of a unique name that is synced, then
renamed over the old one (and the directory synced), so a crash leaves
either the old or the new vault, never half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
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
LOCK_FILE = "vault.lock"
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
# Whether a write waits until it is on the disk (fsync of the file and of its
# directory), so that a save survives a power cut. Always, but in the test
# suite (tests/__init__.py): its profiles go with the test run, a power cut
# is not what it tests, and the writes, renames and locking are the same.
SYNC_WRITES = True


class ProfileError(Exception):
    """A profile that is missing, locked with another passphrase, or damaged."""


def _write_private(path: Path, data: bytes) -> None:
    # A name of its own: two writers never share a temporary file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if SYNC_WRITES:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not SYNC_WRITES:
        return
    # The rename itself survives a crash once the directory is synced.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class ProfileLock:
    """The lock of one profile: a thread lock, and at its outermost level
    the inter-process lock on ``vault.lock``. Taking it brings the
    profile's ``settings`` and ``vault`` up to date with what another
    process wrote, so that a change made under it starts from the latest
    state; ``Profile.save`` writes before it is let go. Re-entrant."""

    def __init__(self, profile: Profile) -> None:
        self._profile = profile
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    def __enter__(self) -> ProfileLock:
        self._thread_lock.acquire()
        try:
            if self._depth == 0:
                self._lock_file()
                try:
                    self._profile._reload()
                except BaseException:
                    self._unlock_file()
                    raise
            self._depth += 1
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._unlock_file()
        self._thread_lock.release()

    @property
    def held(self) -> bool:
        return self._depth > 0

    def _lock_file(self) -> None:
        if self._fd is None:
            self._fd = os.open(self._profile.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _unlock_file(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._thread_lock:
            if self._fd is not None and self._depth == 0:
                os.close(self._fd)
                self._fd = None


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
    decrypted secrets; ``save()`` writes both back. Change them only with
    ``lock`` held, and save before letting it go: the lock makes the
    change a read-modify-write, safe between threads (the Socket.IO client
    calls back on its own) and between processes."""

    def __init__(self, directory: Path, settings: dict[str, Any], vault: dict[str, Any],
                 key: bytes, salt: bytes, opslimit: int = OPSLIMIT,
                 memlimit: int = MEMLIMIT, revision: str | None = None) -> None:
        self.directory = directory
        self.settings = settings
        self.vault = vault
        self.lock = ProfileLock(self)
        self._key = key
        self._salt = salt
        self._opslimit = opslimit
        self._memlimit = memlimit
        # The nonce of the vault as last read or written here: a new one on
        # disk means another process saved since.
        self._revision = revision

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
                      _derive(passphrase, salt, OPSLIMIT, MEMLIMIT), salt, OPSLIMIT, MEMLIMIT)
        with profile.lock:
            # Checked again under the lock: two processes creating one
            # profile at once, and only one of them wins.
            if cls.exists(directory):
                raise ProfileError(f"{directory} already holds a profile")
            profile.save()
        return profile

    @staticmethod
    def _read(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """profile.json and the sealed vault, as stored."""
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
        return settings, sealed

    @staticmethod
    def _unseal(directory: Path, sealed: dict[str, Any], key: bytes) -> dict[str, Any]:
        try:
            nonce = unb64(sealed["nonce"], "nonce", 24)
            ciphertext = unb64(sealed["ciphertext"], "ciphertext")
        except (KeyError, TypeError, ValueError):
            raise ProfileError(f"the vault in {directory} is damaged") from None
        try:
            plaintext = crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, _VAULT_AAD, nonce, key)
        except NaclCryptoError:
            raise ProfileError("wrong passphrase (or a damaged vault)") from None
        return json.loads(plaintext)

    @classmethod
    def open(cls, directory: Path | str, passphrase: str) -> Profile:
        directory = Path(directory)
        if not cls.exists(directory):
            cls._read(directory)  # the error that says what to do
        # The Argon2 parameters never change after create: read once for
        # the key; the lock then reads both files as one consistent state.
        _, sealed = cls._read(directory)
        try:
            salt = unb64(sealed["salt"], "salt")
            opslimit, memlimit = int(sealed["opslimit"]), int(sealed["memlimit"])
        except (KeyError, TypeError, ValueError):
            raise ProfileError(f"the vault in {directory} is damaged") from None
        profile = cls(directory, {}, {}, _derive(passphrase, salt, opslimit, memlimit), salt,
                      opslimit, memlimit)
        with profile.lock:
            pass  # reads the profile
        return profile

    def _reload(self) -> None:
        """(With the file lock held.) Take what another process saved."""
        if not self.exists(self.directory):
            return  # being created
        settings, sealed = self._read(self.directory)
        if sealed.get("nonce") == self._revision:
            return
        self.vault = self._unseal(self.directory, sealed, self._key)
        self.settings = settings
        self._revision = sealed.get("nonce")

    def subkey(self, label: bytes) -> bytes:
        """A 32-byte key for one purpose, derived from the vault key by
        HKDF-SHA-256 under ``label`` (each purpose its own label), so a
        local file can be sealed under the profile's passphrase without
        the vault key itself leaving this object. It stays the same as long
        as the passphrase and the vault's salt do."""
        if not label:
            raise ValueError("a subkey needs a label of its own")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(self._key)

    def close(self) -> None:
        """Let go of the lock file (the profile stays usable: it is opened
        again when needed)."""
        self.lock.close()

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
            # Settings first: a reader that sees the new vault sees them too.
            _write_private(self.directory / PROFILE_FILE,
                           json.dumps(self.settings, indent=1, sort_keys=True).encode("utf-8"))
            _write_private(self.directory / VAULT_FILE, json.dumps(sealed, indent=1).encode("utf-8"))
            self._revision = sealed["nonce"]
