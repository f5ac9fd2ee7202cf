"""
The data directory and the server's secrets.

There is no built-in secret: each one comes from the configuration or is
generated at first start into the data directory (mode 0700), in a file of
its own (mode 0600), and read back on later starts.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field

from twisted.logger import Logger

from cyphr.config import Config, ConfigError

_log = Logger()


@dataclass(frozen=True)
class ServerSecrets:
    """Key material of this server; never logged, never sent."""

    jwt_key: bytes = field(repr=False)
    fingerprint_key: bytes = field(repr=False)
    totp_key: bytes = field(repr=False)  # 32 bytes, a SecretBox key
    # The names of those taken from the data directory rather than the
    # configuration: a cluster's nodes would each have their own.
    generated: tuple[str, ...] = ()

    def fingerprints(self) -> dict[str, str]:
        """What the database records to check that every node has the same
        secrets (cyphr.db.fingerprints); no secret can be recovered from it."""
        from cyphr.db.fingerprints import secret_fingerprint

        return {
            "jwt_secret": secret_fingerprint("jwt_secret", self.jwt_key),
            "fingerprint_key": secret_fingerprint("fingerprint_key", self.fingerprint_key),
            "totp_key": secret_fingerprint("totp_key", self.totp_key),
        }


def prepare_data_dir(path: str) -> str:
    """Create the data directory (mode 0700) if needed and check that this
    process may write in it. Answers its absolute path."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create data directory {path}: {e.strerror or e}") from None
    if not os.path.isdir(path):
        raise ConfigError(f"data directory {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"data directory {path} is not writable by this user")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077 and os.stat(path).st_uid == os.getuid():
        # It holds secrets and, by default, the whole database.
        os.chmod(path, 0o700)
        _log.warn("Tightened the mode of data directory {path} to 0700", path=path)
    return path


def _secret_file(data_dir: str, name: str) -> str:
    """The text of secret ``name``, generated on first use. The file is
    created with O_EXCL so that two processes starting at once agree."""
    path = os.path.join(data_dir, f"{name}.secret")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigError(f"cannot create secret file {path}: {e.strerror or e}") from None
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        _log.info("Generated a new {name} in the data directory", name=name)
    try:
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.getuid():
            os.chmod(path, 0o600)
    except OSError as e:
        raise ConfigError(f"cannot read secret file {path}: {e.strerror or e}") from None
    return read_secret_file(path)


def read_secret_file(path: str) -> str:
    """A secret file's text, checked for length (ConfigError otherwise)."""
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError as e:
        raise ConfigError(f"cannot read secret file {path}: {e.strerror or e}") from None
    if len(value) < 32:
        raise ConfigError(f"secret file {path} is too short (at least 32 characters)")
    return value


def load_secrets(config: Config, data_dir: str) -> ServerSecrets:
    generated = tuple(name for name in ("jwt_secret", "fingerprint_key", "totp_key")
                      if not getattr(config, name))

    def text(name: str) -> str:
        return getattr(config, name) or _secret_file(data_dir, name)

    return ServerSecrets(
        jwt_key=text("jwt_secret").encode("utf-8"),
        fingerprint_key=text("fingerprint_key").encode("utf-8"),
        # SecretBox wants exactly 32 bytes, whatever the operator chose.
        totp_key=hashlib.sha256(text("totp_key").encode("utf-8")).digest(),
        generated=generated,
    )
