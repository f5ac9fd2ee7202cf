"""
The data directory and the server's secrets.

There is no built-in secret: each one comes from the configuration or is
generated at first start into the data directory (mode 0700), in a file of
its own (mode 0600), and read back on later starts.

A server on the embedded SQLite engine holds a lock on its data directory
for as long as it runs (open_data_dir): a second server there would split
the realtime side between two processes that do not know of each other.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import shutil
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
    # What the Web Push (VAPID) key is derived from (cyphr.push.webpush).
    vapid_seed: bytes = field(repr=False, default=b"")
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
            # Web Push subscriptions are bound to the VAPID key it derives.
            "push_vapid_key": secret_fingerprint("push_vapid_key", self.vapid_seed),
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
    generated = tuple(name for name in ("jwt_secret", "fingerprint_key", "totp_key", "push_vapid_key")
                      if not getattr(config, name))

    def text(name: str) -> str:
        return getattr(config, name) or _secret_file(data_dir, name)

    return ServerSecrets(
        jwt_key=text("jwt_secret").encode("utf-8"),
        fingerprint_key=text("fingerprint_key").encode("utf-8"),
        # SecretBox wants exactly 32 bytes, whatever the operator chose.
        totp_key=hashlib.sha256(text("totp_key").encode("utf-8")).digest(),
        vapid_seed=text("push_vapid_key").encode("utf-8"),
        generated=generated,
    )


LOCK_FILE = "cyphr.lock"


class DataDirInUse(ConfigError):
    """Another process holds the data directory's lock."""


class DataDirectory:
    """A data directory opened by a server: its path, its lock (if it took
    one) and whether this process created it. ``close`` releases the lock;
    a directory this process created for a start that never served (a port
    in use, secrets refused, stopped before the database was ready) is
    removed then, so that the next try starts afresh rather than on
    secrets and a database nobody used."""

    def __init__(self, path: str, *, created: bool, lock_fd: int | None) -> None:
        self.path = path
        self.created = created
        self._lock_fd = lock_fd
        self._served = False

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def record_holder(self) -> None:
        """Write this process's id into the lock file, for the refusal of
        a second server to name (after twistd has forked, if it does)."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def served(self) -> None:
        """The server is serving: the directory is in use, and stays."""
        self._served = True

    def close(self) -> None:
        if self.created and not self._served:
            shutil.rmtree(self.path, ignore_errors=True)
            _log.info("Removed the data directory {path} made for this start, which never served",
                      path=self.path)
        if self._lock_fd is not None:
            # Closing the descriptor releases the lock (the OS does the
            # same when the process dies, however it dies).
            os.close(self._lock_fd)
            self._lock_fd = None


def lock_data_dir(path: str) -> int:
    """Take the lock of data directory ``path`` (a prepared one) for this
    process: an exclusive flock(2) on its lock file, which the OS releases
    when the descriptor closes or the process dies, so a crashed server
    leaves no stale lock. The file tells who holds it. Answers the open
    descriptor (close it to release); DataDirInUse if another process, or
    another open in this one, holds it."""
    lock_path = os.path.join(path, LOCK_FILE)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise ConfigError(f"cannot open lock file {lock_path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = ""
        try:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            pass
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"cannot lock data directory {path}: {e.strerror or e}") from None
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise DataDirInUse(
            f"data directory {path} is in use by another Cyphr server{who}: two servers on one "
            "SQLite database would each see only their own realtime clients; stop the other "
            "one, or give this one its own --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def open_data_dir(path: str, *, lock: bool) -> DataDirectory:
    """Prepare the data directory (prepare_data_dir) and, with ``lock``,
    take its lock (lock_data_dir; a directory this call created is removed
    again if that fails)."""
    created = not os.path.isdir(path)
    path = prepare_data_dir(path)
    fd = None
    if lock:
        try:
            fd = lock_data_dir(path)
        except ConfigError:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
    return DataDirectory(path, created=created, lock_fd=fd)
