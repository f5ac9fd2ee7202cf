"""
The client's local store: decrypted history and session state, kept in the
profile directory and encrypted at rest under the profile's key.

``local.sqlite`` (mode 0600, and its ``-wal`` and ``-shm``, which SQLite
gives the same mode) in the profile's 0700 directory.

Keys: HKDF-SHA-256 of the vault key (the Argon2id key of the passphrase)
under ``cyphr-client local-store v1`` gives the store key
(``Profile.subkey``); HKDF of the store key, under labels of their own,
gives an encryption key and an index key.

Every value is JSON sealed with XChaCha20-Poly1305 (a random 24-byte nonce
before the ciphertext). Its associated data names its table and every
lookup column of its row, so a value copied or moved to another row, or a
message whose ``seq`` was changed, does not open. Lookup columns hold
HMAC-SHA-256 under the index key, cut to 16 bytes, of the identifiers
(namespace and key, namespace, message id, chat id), never the identifiers.

In clear: a message's ``seq`` (an integer, for ordering and paging), the
format version, and what the shape of the file tells: how many values and
messages there are and how big each is, which messages share a chat (equal
chat columns), which values share a namespace, the order rows were written
in. No Cyphr ID, chat id, message id, key name, text or key.

Several threads and processes may use one store at once (a ``listen`` and a
``send``). Every change is a SQLite transaction begun with ``BEGIN
IMMEDIATE`` (WAL journal, a busy timeout), which takes the database's write
lock before reading: two processes changing the same state take turns, and
neither undoes the other's change. So a read-modify-write must be made
inside one ``transaction()``. Above all, a session's state is decrypted,
advanced and saved inside one transaction, with the message it opened;
otherwise two processes advance the same state and the key one of them
saved is lost, and with it every message sealed under it::

    with store.transaction() as txn:
        state = txn.get("sessions", peer)
        ...  # open the message, advance the state
        txn.put("sessions", peer, state)
        txn.add_message(record)

Within a process, one connection is shared under a re-entrant lock rather
than one per thread: a transaction then belongs to the thread holding the
lock and every call it makes inside joins it (a nested ``transaction()`` is
a savepoint); other threads queue on the lock instead of polling SQLite's
busy handler; and ``close()`` closes the one connection (a connection per
thread would outlive its thread, open). Transactions are short, a
decryption and a save, so a reader waits little.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as NaclCryptoError

from cyphr.client.profile import Profile

FORMAT = 1
STORE_FILE = "local.sqlite"
# How long a writer waits for another process's transaction before failing.
BUSY_TIMEOUT = 30.0
# SQLite's synchronous setting: FULL, a commit survives a power cut (it may
# hold a session's only key). The test suite sets NORMAL (tests/__init__.py):
# its stores go with the test run, and a power cut is not what it tests.
SYNCHRONOUS = "FULL"
_LABEL = b"cyphr-client local-store v1"
_NONCE_BYTES = 24
_REF_BYTES = 16

# Statements are split on ";": none in the comments.
_SCHEMA = """
-- The format version (in clear), and "check": an empty value sealed under
-- the key, which tells a wrong key from a damaged value.
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
-- ref: index hash of (namespace, key). ns: index hash of the namespace.
-- box: the sealed {"key": key, "value": value}.
CREATE TABLE IF NOT EXISTS kv (
    ref BLOB PRIMARY KEY,
    ns BLOB NOT NULL,
    box BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_ns ON kv (ns);
-- The decrypted history. ref: index hash of the message id. chat: index
-- hash of the chat id. seq: the message's seq, in clear, for paging.
-- box: the sealed record.
CREATE TABLE IF NOT EXISTS messages (
    ref BLOB PRIMARY KEY,
    chat BLOB NOT NULL,
    seq INTEGER NOT NULL,
    box BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_chat_seq ON messages (chat, seq)
"""


class LocalStoreError(Exception):
    """A local store sealed under another key, damaged, of a newer format,
    or closed."""


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def _seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


class LocalStore:
    """An open local store. Use it from any thread; see the module's
    docstring for ``transaction()``, which every read-modify-write needs."""

    def __init__(self, path: Path, connection: sqlite3.Connection, store_key: bytes) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = connection
        self._seal_key = _hkdf(store_key, _LABEL + b" encryption")
        self._index_key = _hkdf(store_key, _LABEL + b" index")
        self._lock = threading.RLock()

    @classmethod
    def open(cls, profile: Profile) -> LocalStore:
        """The profile's store, created if it has none yet."""
        path = profile.directory / STORE_FILE
        # Made 0600 before SQLite opens it: SQLite would follow the umask.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # A commit survives a power cut: it may hold a session's only key.
            db.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
            store = cls(path, db, profile.subkey(_LABEL))
            store._setup()
        except BaseException:
            db.close()
            raise
        return store

    def _setup(self) -> None:
        with self.transaction():
            db = self._connection()
            for statement in _SCHEMA.split(";"):
                db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('format', ?)", (FORMAT,))
            db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('check', ?)",
                       (self._seal(b"", "meta"),))
            meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise LocalStoreError(f"the local store {self.path} is of format"
                                  f" {meta.get('format')!r}; this client reads format {FORMAT}")
        try:
            self._open(meta["check"], "meta")
        except LocalStoreError:
            raise LocalStoreError(f"the local store {self.path} was sealed under another key (the"
                                  f" profile's passphrase or vault changed since, or the file"
                                  f" comes from another profile)") from None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise LocalStoreError("the local store is closed")
        return self._db

    # -- sealing and indexing -------------------------------------------

    def _ref(self, kind: str, *identifiers: str) -> bytes:
        data = json.dumps([kind, *identifiers]).encode("utf-8")
        return hmac.new(self._index_key, data, hashlib.sha256).digest()[:_REF_BYTES]

    @staticmethod
    def _aad(table: str, *columns: bytes) -> bytes:
        # Every column is of fixed length: the concatenation is unambiguous.
        return b"\0".join([_LABEL, table.encode("ascii"), b"".join(columns)])

    def _seal(self, plaintext: bytes, table: str, *columns: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, self._aad(table, *columns), nonce, self._seal_key)

    def _open(self, box: bytes, table: str, *columns: bytes) -> bytes:
        try:
            return crypto_aead_xchacha20poly1305_ietf_decrypt(
                bytes(box[_NONCE_BYTES:]), self._aad(table, *columns),
                bytes(box[:_NONCE_BYTES]), self._seal_key)
        except (NaclCryptoError, TypeError, ValueError):
            raise LocalStoreError(f"a value in {table} of the local store {self.path} does not"
                                  f" open: damaged, moved from another row, or sealed under"
                                  f" another key") from None

    def _seal_json(self, value: Any, table: str, *columns: bytes) -> bytes:
        return self._seal(json.dumps(value, separators=(",", ":")).encode("utf-8"), table, *columns)

    def _open_json(self, box: bytes, table: str, *columns: bytes) -> Any:
        return json.loads(self._open(box, table, *columns))

    # -- transactions ------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[LocalStore]:
        """One SQLite transaction, begun with ``BEGIN IMMEDIATE`` (it waits
        for another process's to end): committed when the block ends,
        rolled back if it raises. Gives the store itself: what this thread
        calls on it inside the block is part of the transaction, and other
        threads wait for the block to end. A nested one is a savepoint."""
        with self._lock:
            db = self._connection()
            outermost = not db.in_transaction
            db.execute("BEGIN IMMEDIATE" if outermost else "SAVEPOINT nested")
            try:
                yield self
                db.execute("COMMIT" if outermost else "RELEASE nested")
            except BaseException:
                if not outermost:
                    db.execute("ROLLBACK TO nested")
                    db.execute("RELEASE nested")
                elif db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._connection().execute(sql, parameters).fetchall()

    def _write(self, sql: str, parameters: tuple[Any, ...]) -> int:
        with self.transaction():
            return self._connection().execute(sql, parameters).rowcount

    # -- key-value -----------------------------------------------------------

    def get(self, namespace: str, key: str) -> Any | None:
        """The value of ``key`` in ``namespace``, or None."""
        ref, ns = self._ref("kv", namespace, key), self._ref("ns", namespace)
        rows = self._read("SELECT box FROM kv WHERE ref = ?", (ref,))
        return self._open_json(rows[0][0], "kv", ref, ns)["value"] if rows else None

    def put(self, namespace: str, key: str, value: Any) -> None:
        """Set ``key`` in ``namespace`` to ``value`` (anything JSON holds)."""
        ref, ns = self._ref("kv", namespace, key), self._ref("ns", namespace)
        box = self._seal_json({"key": key, "value": value}, "kv", ref, ns)
        self._write("INSERT OR REPLACE INTO kv (ref, ns, box) VALUES (?, ?, ?)", (ref, ns, box))

    def delete(self, namespace: str, key: str) -> None:
        self._write("DELETE FROM kv WHERE ref = ?", (self._ref("kv", namespace, key),))

    def items(self, namespace: str) -> dict[str, Any]:
        """Every key of ``namespace`` and its value."""
        ns = self._ref("ns", namespace)
        rows = self._read("SELECT ref, box FROM kv WHERE ns = ?", (ns,))
        entries = (self._open_json(box, "kv", ref, ns) for ref, box in rows)
        return {entry["key"]: entry["value"] for entry in entries}

    # -- messages ------------------------------------------------------------

    def _message_row(self, record: dict[str, Any]) -> tuple[bytes, bytes, int, bytes]:
        message_id, chat_id, seq = record.get("id"), record.get("chatId"), record.get("seq")
        if not isinstance(message_id, str) or not isinstance(chat_id, str) or type(seq) is not int:
            raise ValueError("a message record needs a string id and chatId and an integer seq")
        ref, chat = self._ref("message", message_id), self._ref("chat", chat_id)
        return ref, chat, seq, self._seal_json(record, "messages", ref, chat, _seq_bytes(seq))

    def _open_message(self, ref: bytes, chat: bytes, seq: int, box: bytes) -> dict[str, Any]:
        return self._open_json(box, "messages", ref, chat, _seq_bytes(seq))

    def add_message(self, record: dict[str, Any]) -> bool:
        """Keep a message: ``record`` has at least "id", "chatId" and an
        integer "seq". False, keeping the first, if its id was there."""
        return self._write("INSERT OR IGNORE INTO messages (ref, chat, seq, box)"
                           " VALUES (?, ?, ?, ?)", self._message_row(record)) == 1

    def message(self, message_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT ref, chat, seq, box FROM messages WHERE ref = ?",
                          (self._ref("message", message_id),))
        return self._open_message(*rows[0]) if rows else None

    def messages(self, chat_id: str, limit: int = 50, before_seq: int | None = None,
                 after_seq: int | None = None) -> list[dict[str, Any]]:
        """Messages of a chat in ascending seq: the first ``limit`` after
        ``after_seq`` if it is given, else the latest ``limit`` (before
        ``before_seq`` if it is given)."""
        where, parameters = ["chat = ?"], [self._ref("chat", chat_id)]
        if before_seq is not None:
            where.append("seq < ?")
            parameters.append(before_seq)
        if after_seq is not None:
            where.append("seq > ?")
            parameters.append(after_seq)
        order = "ASC" if after_seq is not None else "DESC"
        rows = self._read(f"SELECT ref, chat, seq, box FROM messages WHERE {' AND '.join(where)}"
                          f" ORDER BY seq {order}, rowid {order} LIMIT ?",
                          (*parameters, limit))
        if order == "DESC":
            rows.reverse()
        return [self._open_message(*row) for row in rows]

    def all_messages(self) -> list[dict[str, Any]]:
        """Every kept message of every chat, in the order they were kept
        (for the history backup, cyphr.client.backup)."""
        rows = self._read("SELECT ref, chat, seq, box FROM messages ORDER BY rowid", ())
        return [self._open_message(*row) for row in rows]

    def update_message(self, message_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Merge ``changes`` into a kept message (receipts, a deletion, its
        seq once the server gave it); answers the new record, or None if
        there is no such message. Its id does not change."""
        if changes.get("id", message_id) != message_id:
            raise ValueError("a message's id does not change")
        with self.transaction():
            record = self.message(message_id)
            if record is None:
                return None
            record.update(changes)
            ref, chat, seq, box = self._message_row(record)
            self._write("UPDATE messages SET chat = ?, seq = ?, box = ? WHERE ref = ?",
                        (chat, seq, box, ref))
        return record
