"""
The history backup (docs/encryption.rst, "The history backup"): the
messages this device kept in its local store, compressed and sealed under
a key derived from the identity seed, stored on the server as one opaque
blob per identity (``/api/cyphr-id/history-backup``). A device recovered
from the phrase, or newly linked (it holds the seed), restores it, and so
reads the past that messages over sessions no longer give it.

Opt-in, per device (``historyBackup`` in the vault): whoever holds the
phrase opens the backup, which is the point of it and its cost. When on,
the backup is written at once, rewritten at most once every
:data:`INTERVAL_MS` by whatever opens messages (``history``, ``sync``, a
listener), best effort, and written again before this device approves a
new one, which restores it: the transfer of history to a linked device is
this same blob.

The blob, byte for byte::

    key  = HKDF-SHA256(ikm = seed (64 bytes), salt = none,
                       info = "cyphr-client history-backup v1", 32 bytes)
    aad  = opaque("cyphr-client history-backup v1") || opaque(cyphrId) || uint8(1)
    blob = 0x01 || nonce (24, random) || XChaCha20-Poly1305(key, nonce, padded, aad)
    padded = uint32(len(z)) || z || zeros, to a multiple of 64 KiB (or the limit)
    z    = zlib(JSON {"counter", "format": 1, "messages": [record...], "time"})

Records are the local store's (:mod:`cyphr.client.sessionbook`'s
``keep_sent`` and ``open_message``), the newest first; when they do not
all fit under the server's limit, the oldest are left out. No session
state and no key goes in: a restored device starts sessions of its own.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as NaclCryptoError

from cyphr import signing
from cyphr.client.crypto import CryptoError, b64, iso_ms, parse_iso_ms, unb64
from cyphr.client.http import ApiError, ClientError

if TYPE_CHECKING:
    from cyphr.client.client import Client

_log = logging.getLogger(__name__)

LABEL = "cyphr-client history-backup v1"
FORMAT = 1
PATH = "/api/cyphr-id/history-backup"
VAULT_KEY = "historyBackup"
NOT_FOUND = "HISTORY_BACKUP_NOT_FOUND"
# The server's default max_history_backup; a server with a smaller limit
# says so (413, details.limit), and the client keeps what it said.
DEFAULT_LIMIT = 7 * 1024 * 1024
# A body the server refused whole (max_body): what is left for the blob.
_BODY_FRAMING = 1024
INTERVAL_MS = 24 * 3600 * 1000  # the schedule: at most one rewrite a day
# A smaller limit a server named is kept this long, then the default is
# tried again (the operator may have raised it).
LIMIT_KEPT_MS = 7 * INTERVAL_MS
RETRY_MS = 3600 * 1000  # after a failed scheduled rewrite, wait this long
PAD_BYTES = 64 * 1024  # the blob's size says how large it is to 64 KiB
_FIT_GROUP = 256  # records between two looks at the compressed size
MAX_CONTENT_BYTES = 256 * 1024 * 1024  # decompressed, at most
NONCE_BYTES = 24
TAG_BYTES = 16
OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES
# What a record may hold, and of which type; anything else is left out.
_REQUIRED = {"id": str, "chatId": str, "seq": int}
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "senderId": (str,), "senderDeviceId": (int,), "messageType": (str,),
    "clientMessageId": (str,), "text": (str,), "sentAt": (int,), "timestamp": (str,),
    "missing": (int,), "verified": (bool,)}


class BackupRefused(CryptoError):
    """A history backup that does not open, or not as one."""


@dataclass(frozen=True)
class Written:
    """A backup written: its size in bytes, how many messages it holds of
    how many this device keeps, and when the server took it."""

    size: int
    messages: int
    kept: int
    updated_at: str | None

    def as_json(self) -> dict[str, Any]:
        return {"size": self.size, "messages": self.messages, "kept": self.kept,
                "updatedAt": self.updated_at}


# -- the blob ---------------------------------------------------------------------------

def backup_key(seed: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=LABEL.encode("ascii")).derive(seed)


def backup_aad(cyphr_id: str) -> bytes:
    return signing.text(LABEL) + signing.text(cyphr_id) + signing.uint8(FORMAT)


def _padded(compressed: bytes, room: int) -> bytes | None:
    body = len(compressed).to_bytes(4, "big") + compressed
    if len(body) > room:
        return None
    size = min(-(-len(body) // PAD_BYTES) * PAD_BYTES, room)
    return body + bytes(size - len(body))


def _seal(seed: bytes, cyphr_id: str, padded: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return bytes([FORMAT]) + nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(
        padded, backup_aad(cyphr_id), nonce, backup_key(seed))


def _compressed_fitting(encoded: list[bytes], head: bytes, tail: bytes, room: int
                        ) -> tuple[bytes, int] | None:
    """zlib of ``head``, the first records of ``encoded`` joined by commas,
    and ``tail``, padded to at most ``room`` bytes, with as many records as
    fit; and how many. None when not even none fit.

    One pass of the compressor over the records that fit: every
    _FIT_GROUP records, a copy of its state is finished to learn the size
    the stream would have if it ended there; within the group that
    overflows, the same from the group's start, by halving."""
    deflate = zlib.compressobj()
    emitted = bytearray(deflate.compress(head))

    def ending(records: list[bytes], first: bool) -> bytes:
        """The rest of the stream, were ``records`` the last ones."""
        finish = deflate.copy()
        body = (b"" if first or not records else b",") + b",".join(records)
        return finish.compress(body + tail) + finish.flush()

    def fits(rest: bytes) -> bool:
        return 4 + len(emitted) + len(rest) <= room

    start = 0
    # The stream as checked: what was emitted up to ``before``, then ``rest``.
    before, rest = len(emitted), ending([], True)
    if not fits(rest):
        return None
    while start < len(encoded):
        group = encoded[start:start + _FIT_GROUP]
        tried = ending(group, start == 0)
        if not fits(tried):
            # The last that fits is within this group.
            rest = ending([], start == 0)
            fitting, too_many = 0, len(group)
            while too_many - fitting > 1:
                middle = (fitting + too_many) // 2
                tried = ending(group[:middle], start == 0)
                if fits(tried):
                    fitting, rest = middle, tried
                else:
                    too_many = middle
            padded = _padded(bytes(emitted) + rest, room)
            assert padded is not None
            return padded, start + fitting
        before, rest = len(emitted), tried
        emitted += deflate.compress((b"" if start == 0 else b",") + b",".join(group))
        start += len(group)
    padded = _padded(bytes(emitted[:before]) + rest, room)
    assert padded is not None
    return padded, len(encoded)


def seal(seed: bytes, cyphr_id: str, records: list[dict[str, Any]], counter: int, now: int,
         limit: int) -> tuple[bytes, int]:
    """The blob of as many of ``records`` (newest first) as fit in
    ``limit`` bytes, the first ones kept; and how many it holds."""
    encoded = [json.dumps(r, sort_keys=True, separators=(",", ":")).encode("utf-8")
               for r in records]
    head = b'{"counter":%d,"format":%d,"messages":[' % (counter, FORMAT)
    fitted = _compressed_fitting(encoded, head, b'],"time":%d}' % now, limit - OVERHEAD)
    if fitted is None:
        raise ClientError(f"the server takes history backups of {limit} bytes at most: not "
                          f"even an empty one fits")
    padded, count = fitted
    return _seal(seed, cyphr_id, padded), count


def open_blob(seed: bytes, cyphr_id: str, blob: bytes) -> dict[str, Any]:
    """The content of a blob: ``{"counter", "format", "messages", "time"}``
    (the messages as they were sealed, not yet checked one by one).
    BackupRefused when it does not open with this identity's key, for this
    Cyphr ID, or is not a backup's shape."""
    if len(blob) < OVERHEAD + 4 or blob[0] != FORMAT:
        raise BackupRefused(f"the history backup is not one of format {FORMAT} (too short, or "
                            f"of another format)")
    try:
        padded = crypto_aead_xchacha20poly1305_ietf_decrypt(
            blob[1 + NONCE_BYTES:], backup_aad(cyphr_id), blob[1:1 + NONCE_BYTES],
            backup_key(seed))
    except NaclCryptoError:
        raise BackupRefused("the history backup does not open with this identity's key: "
                            "altered on the server, or another account's") from None
    length = int.from_bytes(padded[:4], "big")
    if length > len(padded) - 4 or any(padded[4 + length:]):
        raise BackupRefused("the history backup is not padded as it should be")
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(padded[4:4 + length], MAX_CONTENT_BYTES)
    except zlib.error:
        raise BackupRefused("the history backup does not decompress") from None
    if inflate.unconsumed_tail or not inflate.eof:
        raise BackupRefused(f"the history backup is larger than {MAX_CONTENT_BYTES} bytes "
                            f"decompressed, or cut short")
    try:
        content = json.loads(raw)
    except ValueError:
        raise BackupRefused("the history backup is not JSON") from None
    if not (isinstance(content, dict) and content.get("format") == FORMAT
            and isinstance(content.get("messages"), list)
            and _is_int(content.get("counter")) and _is_int(content.get("time"))):
        raise BackupRefused("the history backup does not hold a format, a counter, a time and "
                            "messages")
    return content


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked_record(value: Any) -> dict[str, Any] | None:
    """A record of the backup as it goes to the local store: the fields it
    may hold, each of its type; None when it lacks one it needs."""
    if not isinstance(value, dict):
        return None
    record: dict[str, Any] = {}
    for name, kind in _REQUIRED.items():
        field = value.get(name)
        if not isinstance(field, kind) or isinstance(field, bool) or field == "":
            return None
        record[name] = field
    for name, kinds in _OPTIONAL.items():
        field = value.get(name)
        if field is None:
            continue
        if not isinstance(field, kinds) or (bool not in kinds and isinstance(field, bool)):
            return None
        record[name] = field
    return record


def _newest_first(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def when(record: dict[str, Any]) -> int:
        if _is_int(record.get("sentAt")):
            return record["sentAt"]
        try:
            return parse_iso_ms(record.get("timestamp"), "timestamp")
        except CryptoError:
            return 0
    return sorted(records, key=lambda r: (when(r), r["seq"]), reverse=True)


# -- this device's backup ---------------------------------------------------------------

def state(client: Client) -> dict[str, Any]:
    """The vault's record: ``on``, ``counter``, and of the last upload
    ``lastAt`` (ms), ``lastSize``, ``lastMessages``; ``limit`` when the
    server named a smaller one (and ``limitAt``, when); ``lastTriedAt`` and
    ``lastError`` after a scheduled rewrite failed."""
    with client.profile.lock:
        return dict(client.profile.vault.get(VAULT_KEY) or {"on": False})


def _update(client: Client, **changes: Any) -> dict[str, Any]:
    with client.profile.lock:
        record = dict(client.profile.vault.get(VAULT_KEY) or {"on": False})
        record.update(changes)
        client.profile.vault[VAULT_KEY] = record
        client.profile.save()
    return record


def _limit_from(error: ApiError) -> int | None:
    """The limit a 413 names: the blob's, or the body's (then what is left
    of it for the blob's base64)."""
    details = error.details if isinstance(error.details, dict) else {}
    limit = details.get("limit")
    if not _is_int(limit) or limit <= 0:
        return None
    return limit if details.get("field") == "blob" else max(0, (limit - _BODY_FRAMING) // 4 * 3)


def write(client: Client) -> Written:
    """Seal what this device keeps and upload it, replacing the server's
    copy; answers what was written. When the server refuses it as too
    large, it is sealed again for the limit the server names, once.
    ClientError (or ApiError) when it could not be."""
    with client._history_backup_lock:
        kept = [r for r in (checked_record(v) for v in client.store.all_messages()) if r]
        records = _newest_first(kept)
        current = state(client)
        counter = int(current.get("counter", 0)) + 1
        limit, named_at = current.get("limit"), current.get("limitAt")
        if not (_is_int(limit) and _is_int(named_at)
                and 0 <= client._now() - named_at < LIMIT_KEPT_MS):
            limit = DEFAULT_LIMIT
        for attempt in (1, 2):
            now = client._now()
            blob, count = seal(client.identity.seed, client.cyphr_id, records, counter, now, limit)
            try:
                answer = client._call("PUT", PATH, {"blob": b64(blob)})
            except ApiError as e:
                smaller = _limit_from(e) if e.status == 413 else None
                if attempt == 2 or smaller is None or smaller >= limit:
                    raise
                _log.info("The server takes history backups of %d bytes at most: sealing it "
                          "again to fit", smaller)
                limit = smaller
                _update(client, limit=limit, limitAt=client._now())
                continue
            break
        _update(client, counter=counter, lastAt=now, lastSize=len(blob), lastMessages=count,
                lastTriedAt=now, lastError=None)
        if count < len(records):
            _log.info("The history backup holds the newest %d of %d messages (the server's "
                      "limit is %d bytes)", count, len(records), limit)
        return Written(len(blob), count, len(records), answer.get("updatedAt"))


def turn_on(client: Client) -> Written:
    """Write the backup now, then keep it on (rewritten on schedule)."""
    written = write(client)
    _update(client, on=True)
    return written


def turn_off(client: Client) -> bool:
    """Stop writing the backup and delete the server's copy; whether there
    was one. Off here first: a failure to delete leaves no rewrite; and
    once a write under way in this process has ended (it would put a copy
    back after the delete)."""
    with client._history_backup_lock:
        _update(client, on=False)
        return bool(client._call("DELETE", PATH, {}).get("deleted"))


def due(client: Client) -> bool:
    """Whether the schedule asks for a rewrite now."""
    record = state(client)
    if not record.get("on"):
        return False
    now = client._now()
    last, tried = record.get("lastAt"), record.get("lastTriedAt")
    if _is_int(tried) and 0 <= now - tried < RETRY_MS and tried != last:
        return False  # a rewrite failed a moment ago
    return not _is_int(last) or not 0 <= now - last < INTERVAL_MS


def write_quietly(client: Client, why: str) -> bool:
    """Write the backup, logging rather than raising a failure (which is
    kept as ``lastError``); answers whether it was written."""
    try:
        write(client)
        return True
    except Exception as e:  # noqa: BLE001 - best effort: never the caller's failure
        problem = str(e) if isinstance(e, (ClientError, CryptoError)) else \
            f"{type(e).__name__}: {e}"
        _log.warning("Could not write the history backup (%s): %s", why, problem,
                     exc_info=not isinstance(e, (ClientError, CryptoError)))
        try:
            _update(client, lastTriedAt=client._now(), lastError=problem)
        except Exception:  # noqa: BLE001 - the vault itself failed: logged above
            pass
        return False


def write_if_due(client: Client) -> bool:
    """The schedule: rewrite when on and due, best effort; answers whether
    it wrote."""
    try:
        if not due(client):
            return False
    except Exception as e:  # noqa: BLE001 - best effort
        _log.warning("Could not tell whether the history backup is due: %s", e)
        return False
    with client._history_backup_lock:
        if not due(client):  # another thread wrote it meanwhile
            return False
        return write_quietly(client, "on schedule")


def before_link(client: Client) -> None:
    """Before this device approves a new one, which restores the backup:
    a fresh one, when backups are on (best effort)."""
    if state(client).get("on"):
        write_quietly(client, "for the device being linked")


def status(client: Client) -> dict[str, Any]:
    """What ``cyphr-client backup status`` shows."""
    record = state(client)
    last = record.get("lastAt")
    return {"on": bool(record.get("on")),
            "lastAt": iso_ms(last) if _is_int(last) else None,
            "lastSize": record.get("lastSize"), "lastMessages": record.get("lastMessages"),
            "lastError": record.get("lastError"),
            "nextAt": iso_ms(last + INTERVAL_MS) if record.get("on") and _is_int(last) else None}


def restore(client: Client, *, keep_on: bool) -> int:
    """Add the backup's messages to the local store, marked restored (one
    kept already stays as it is); answers how many were added: 0 when
    there is no backup. ``keep_on``: a backup found turns backups on for
    this device (a recovered one takes the place of the one that wrote
    it). ClientError, ApiError or BackupRefused when it could not be read;
    then nothing is added."""
    try:
        answer = client._call("GET", PATH)
    except ApiError as e:
        if e.code == NOT_FOUND:
            return 0
        raise
    try:
        blob = unb64(answer.get("blob"), "the history backup")
    except CryptoError as e:
        raise BackupRefused(str(e)) from None
    content = open_blob(client.identity.seed, client.cyphr_id, blob)
    added: list[dict[str, Any]] = []
    store = client.store
    with store.transaction() as txn:
        for value in content["messages"]:
            record = checked_record(value)
            if record is not None and txn.add_message({**record, "restored": True}):
                added.append(record)
    # Group name keys came in system messages, which the device that kept
    # them had taken: taken here too, oldest first (a group's roster still
    # decides which key counts). A linked device has them already.
    for record in sorted((r for r in added if r.get("messageType") == "system"
                          and isinstance(r.get("text"), str)), key=lambda r: r["seq"]):
        try:
            client._system_message(record["chatId"], record["text"], record.get("senderId"))
        except Exception as e:  # noqa: BLE001 - best effort: the messages are restored
            _log.warning("A restored system message of chat %s was not taken: %s",
                         record["chatId"], e)
    if keep_on:
        now = client._now()
        _update(client, on=True, lastAt=now, lastTriedAt=now,
                counter=max(content["counter"], int(state(client).get("counter", 0))))
    return len(added)


def restore_quietly(client: Client, *, keep_on: bool,
                    report: Callable[[int | None, str | None], None]) -> None:
    """:func:`restore`, best effort: ``report(added, None)``, or
    ``report(0, why)`` when it could not be read. Never raises: the
    recovery or link it ends has taken place on the server already."""
    try:
        report(restore(client, keep_on=keep_on), None)
    except Exception as e:  # noqa: BLE001 - best effort, see above
        expected = isinstance(e, (ClientError, CryptoError))
        problem = str(e) if expected else f"{type(e).__name__}: {e}"
        _log.warning("The history backup of %s could not be restored from %s: %s",
                     client.cyphr_id, client.origin, problem, exc_info=not expected)
        report(0, problem)
