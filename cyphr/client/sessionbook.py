"""
Messages over sessions on the client (docs/encryption.rst, "Messages over
sessions"): which session each device pair uses, sending with them and
opening what arrives. Functions of a :class:`~cyphr.client.client.Client`,
whose ``send_sealed`` and ``open_message`` call them.

Everything this keeps is in the profile's local store
(cyphr.client.localstore), encrypted at rest:

- ``sessions``, by peer device (``cyphrId/deviceId``): the session's
  export, the handshake while the session's messages carry it (this
  device started it and its peer has not answered), the ephemeral key of
  the handshake that started it (a later envelope carrying the same
  handshake goes to it), and the session before it, kept so that
  messages sealed in it still open after the peer started a new one (both
  sides started one at once, or the peer lost its state);
- ``counters``: the next counter of this device in each chat (by chat id,
  or ``direct:<Cyphr ID>`` for a direct chat, whose first message has no
  chat id yet);
- ``seen``: the counters seen in each chat (cyphr.client.counters);
- the decrypted messages, the device's own sent ones included: an
  envelope opens once, and the server erases a body once every device
  acknowledged it, so what a device read is kept here or nowhere.

Each read-modify-write of a session runs in one store transaction, which
other processes on the profile wait for: a listener and a sender at once
never lose a key. A session is saved before its message is sent, so that
no message key is ever used twice.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import TYPE_CHECKING, Any, Callable

from cyphr.client import devices, groups, sessionmessages, sessions
from cyphr.client.counters import Counters
from cyphr.client.crypto import b64, iso_ms, unb64
from cyphr.client.http import ApiError, ClientError
from cyphr.client.sealing import sealed_again_once
from cyphr.client.sessionmessages import BodyHeader, MessageRefused, Recipient
from cyphr.client.sessions import Handshake, Session, SessionError
from cyphr.rosters import RosterRefused, RosterState

if TYPE_CHECKING:
    from cyphr.client.client import Client

_log = logging.getLogger(__name__)

SESSIONS, COUNTERS, SEEN, PENDING = "sessions", "counters", "seen", "pending"
PLACEHOLDER_BYTES = 160  # about a session message carrying an envelope


class NoSession(ClientError):
    """A device of the chat cannot be reached over sessions (it published
    no session keys: its client lacks them, or the server has none): the
    message is sealed as version 3 instead. A device whose key or bundle
    is refused is not a reason: it gets no envelope it can open, and the
    others stay over sessions."""


def _key(cyphr_id: str, device_id: int) -> str:
    return f"{cyphr_id}/{device_id}"


def _session_record(session: Session, handshake: Handshake | None, ephemeral: str | None,
                    previous: dict[str, Any] | None) -> dict[str, Any]:
    """What is kept of the session with one device: the session, the
    handshake its messages carry (None once the peer answered), the
    ephemeral key (base64) of the peer's handshake that started it (None
    when this device started it), and the session before it with its
    ephemeral key, or None."""
    if handshake is not None and sessionmessages.envelope_kind(session, handshake) != \
            sessionmessages.PREKEY:
        handshake = None  # the peer answered: its messages need the handshake no more
    return {"state": session.export(), "handshake": b64(handshake.encode()) if handshake else None,
            "ephemeral": ephemeral, "previous": previous}


def _known(record: dict[str, Any] | None) -> list[tuple[Session, str | None]]:
    """The sessions kept with one device, the current first, each with the
    ephemeral key of the peer's handshake that started it."""
    if record is None:
        return []
    known = [(Session.load(record["state"]), record.get("ephemeral"))]
    if record.get("previous"):
        known.append((Session.load(record["previous"]["state"]), record["previous"].get("ephemeral")))
    return known


def _loaded(record: dict[str, Any]) -> tuple[Session, Handshake | None]:
    handshake = record.get("handshake")
    return (Session.load(record["state"]),
            Handshake.decode(unb64(handshake, "handshake")) if handshake else None)


# -- sending ---------------------------------------------------------------------------

def _devices(client: Client, members: list[str]
             ) -> tuple[list[tuple[str, int]], list[tuple[str, int, str]]]:
    """Every device of every member but this one whose key is signed by
    its identity's pinned key (checked as for version 3), and those
    refused, with why."""
    targets, refused = [], []
    for cyphr_id in sorted(set(members)):
        usable, bad = devices.usable_devices(client, cyphr_id)
        if not usable and cyphr_id != client.cyphr_id:
            raise ClientError(f"none of {cyphr_id}'s devices may be sealed to: " + "; ".join(
                f"device {d.device_id}: {d.problem}" for d in bad))
        refused += [(cyphr_id, d.device_id, d.problem or "refused") for d in bad]
        targets += [(cyphr_id, d.device_id) for d in usable
                    if (cyphr_id, d.device_id) != (client.cyphr_id, client.device_id)]
    return targets, refused


def _new_sessions(client: Client, targets: list[tuple[str, int]]
                  ) -> tuple[dict[tuple[str, int], tuple[Session, Handshake]],
                             list[tuple[str, int, str]]]:
    """A session for each of ``targets``, from its bundle (claimed, and
    checked against the pinned identity key), and the devices whose bundle
    was refused, with why. NoSession for a device that has no bundle to
    give (its client lacks sessions)."""
    made, refused = {}, []
    me = client.session_me()
    for cyphr_id, device_id in targets:
        try:
            good, bad = client.session_bundles(cyphr_id, device_id)
        except ApiError as e:
            if e.status != 404:
                raise
            # A server without sessions, or a device gone since its list.
            raise NoSession(f"no bundle for device {device_id} of {cyphr_id}: {e}") from None
        bundle = next((b for b in good if b.device_id == device_id), None)
        if bundle is not None:
            made[(cyphr_id, device_id)] = sessions.initiate(
                me, bundle, client._sender_key(cyphr_id), client._now())
        elif bad:
            refused.append((cyphr_id, device_id, f"its session bundle was refused: {bad[0][1]}"))
        else:
            raise NoSession(f"device {device_id} of {cyphr_id} published no session keys")
    return made, refused


def sealed(client: Client, target: dict[str, str], chat_id: str | None, members: list[str],
           plaintext: bytes, message_type: str, ghosts: list[str] = (),
           roster: RosterState | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The body of a send over sessions to ``members``' devices, and this
    device's own record of it (kept once the server has stored it:
    :func:`keep_sent`); ``roster`` is the group's (its epoch and hash go in
    the header), and ``ghosts`` are members the server lists that it does
    not: their devices get envelopes of random bytes. NoSession if a device
    cannot be reached so."""
    targets, refused = _devices(client, members)
    for ghost in ghosts:
        refused += [(ghost, d.device_id, "not a member of the group's roster")
                    for d in devices.devices_of(client, ghost)]
    store = client.store
    known = {t for t in targets if store.get(SESSIONS, _key(*t)) is not None}
    started, bad_bundles = _new_sessions(client, [t for t in targets if t not in known])
    refused += bad_bundles
    targets = [t for t in targets if t in known or t in started]
    for cyphr_id, device_id, problem in refused:
        _log.warning("Not sealing to device %s of %s: %s", device_id, cyphr_id, problem)
    client.refused_devices = refused
    others = sorted(set(members) - {client.cyphr_id})
    # A note to oneself is a direct chat of one member.
    direct_with = (others or [client.cyphr_id])[0] if chat_id is None else None
    # A first direct message has no chat yet: its counter is the partner's
    # until the server names the chat (keep_sent).
    counter_key = chat_id if chat_id is not None else f"direct:{direct_with}"
    now = client._now()
    with store.transaction() as txn:
        recipients = []
        records = {}
        for t in targets:
            record = txn.get(SESSIONS, _key(*t))
            if record is not None:  # kept, or made meanwhile by another process
                session, handshake = _loaded(record)
                ephemeral, previous = record.get("ephemeral"), record.get("previous")
            else:
                session, handshake = started[t]
                ephemeral, previous = None, None  # started here: no handshake of the peer's
            recipients.append(Recipient(session, handshake))
            records[t] = (session, handshake, ephemeral, previous)
        counter = int(txn.get(COUNTERS, counter_key) or 1)
        header = BodyHeader(chat_id, client.cyphr_id, client.device_id, message_type,
                            str(uuid.uuid4()), counter, now, direct_with=direct_with,
                            roster_epoch=roster.epoch if roster else None,
                            roster_hash=roster.state_hash() if roster else None)
        result = sessionmessages.seal(plaintext, header, recipients)
        # Saved before the send: a counter or message key is never used twice.
        txn.put(COUNTERS, counter_key, counter + 1)
        for t, (session, handshake, ephemeral, previous) in records.items():
            txn.put(SESSIONS, _key(*t), _session_record(session, handshake, ephemeral, previous))
        own = {"senderId": client.cyphr_id, "senderDeviceId": client.device_id,
               "messageType": message_type, "clientMessageId": header.client_message_id,
               "text": plaintext.decode("utf-8", errors="replace"), "sentAt": now,
               "counter": counter, "firstDirect": chat_id is None}
        # Kept before it is sent: another process on this profile may be
        # given it back by the server before this one has the answer.
        txn.put(PENDING, header.client_message_id, own)
    # A refused device (its key is not signed by its identity: the server's
    # own) gets an envelope of random bytes: the server insists on an envelope for every
    # device of the chat, and falling back to version 3 would let it take
    # forward secrecy away from everyone by substituting one key.
    placeholders = [{"cyphrId": cyphr_id, "deviceId": device_id, "kind": sessionmessages.MESSAGE,
                     "envelope": b64(sessionmessages.encode_envelope(
                         os.urandom(PLACEHOLDER_BYTES), None))}
                    for cyphr_id, device_id, _ in refused]
    body = {**target, "encryptedPayload": result.payload, "messageType": message_type,
            "clientMessageId": header.client_message_id,
            "envelopes": sorted(result.envelopes + placeholders,
                                key=lambda e: (e["cyphrId"], e["deviceId"]))}
    return body, own


def keep_sent(client: Client, own: dict[str, Any], answer: dict[str, Any]) -> None:
    """This device's copy of what it sent, once the server stored it; after
    a first direct message, the chat the server made counts on from it."""
    chat_id = answer["chatId"]
    own = dict(own)
    with client.store.transaction() as txn:
        if own.pop("firstDirect"):
            txn.put(COUNTERS, chat_id, max(int(txn.get(COUNTERS, chat_id) or 1), own["counter"] + 1))
        own.pop("counter")
        txn.delete(PENDING, own["clientMessageId"])
        txn.add_message({**own, "id": answer["messageId"], "chatId": chat_id,
                         "seq": answer["seq"], "timestamp": answer.get("timestamp")})


def send(client: Client, target: dict[str, str], chat_id: str | None, members: list[str],
         plaintext: bytes, message_type: str,
         transmit: Callable[[dict[str, Any]], dict[str, Any]], *, ghosts: list[str] = (),
         roster: RosterState | None = None) -> dict[str, Any]:
    """Seal over sessions and ``transmit``; refused DEVICES_CHANGED, sealed
    again for the devices now, once. NoSession before anything is sent if
    a device cannot be reached so."""
    def seal_and_send() -> dict[str, Any]:
        body, own = sealed(client, target, chat_id, members, plaintext, message_type, ghosts,
                           roster)
        try:
            answer = transmit(body)
        except ApiError:
            client.store.delete(PENDING, body["clientMessageId"])
            raise
        keep_sent(client, own, answer)
        return answer

    return sealed_again_once(seal_and_send)


# -- opening ---------------------------------------------------------------------------

def _promote(record: dict[str, Any], used_ephemeral: str | None, started: bool,
             me: tuple[str, int], peer: tuple[str, int]) -> bool:
    """Whether a message that opened in a session other than the current
    one (a new one the peer started, or the one before) makes it current.
    As in Signal, the session the peer sends in becomes the one to answer
    in, with one exception, so that two devices that start sessions with
    each other at once come to use one session, not swap both ways: of two
    sessions neither of which has been answered both ways, the one the
    lesser device (by Cyphr ID, then device id) started wins."""
    current_started_by = peer if record.get("ephemeral") else me
    used_started_by = peer if used_ephemeral else me
    first = min(me, peer)
    if started:
        if record.get("ephemeral") is None and record.get("handshake") is not None:
            # This device started the current session and has no answer
            # yet: both started at once.
            return used_started_by == first
        return True  # the peer started anew (it lost its state): answer in the new one
    return not (current_started_by == first and used_started_by != first)


def _respond(client: Client, handshake: Handshake | None, sender: str) -> Session | None:
    """The session ``handshake`` starts (made before the store's
    transaction, which must not wait for the vault's lock)."""
    if handshake is None:
        return None
    secrets = client.session_secrets(handshake)
    try:
        return sessions.respond(client.session_me(), handshake, client._sender_key(sender),
                                secrets, client._now())
    except SessionError as e:
        raise MessageRefused(f"the session does not start: {e}") from None


def open_message(client: Client, message: dict[str, Any],
                 direct_members: frozenset[str] | None) -> dict[str, Any]:
    """Open a message over sessions, keep it, and answer its record (as
    :func:`keep_sent` makes them): from the store when this device opened
    or sent it before (another process on the profile may have, just
    now); MessageRefused (or another CryptoError) saying why not."""
    sender, device_id = message.get("senderId"), message.get("senderDeviceId")
    if not isinstance(sender, str) or type(device_id) is not int:
        raise MessageRefused("the message names no sending device")
    mine = (sender, device_id) == (client.cyphr_id, client.device_id)
    if not mine and "envelope" not in message:
        raise MessageRefused(f"device {client.device_id} of {client.cyphr_id} is not a recipient "
                             f"of this message (the server gave it no envelope)")
    handshake = None if mine else sessionmessages.handshake_of(message)
    key = _key(sender, device_id)
    chat_id = message.get("chatId")
    _check_roster(client, message)
    with client.store.transaction() as txn:
        kept = txn.message(message.get("id"))
        if kept is not None:
            return kept
        if mine:
            return _own_copy(txn, message)
    ephemeral = b64(handshake.ephemeral) if handshake is not None else None
    responded = None
    if handshake is not None and all(e != ephemeral for _, e in _known(client.store.get(SESSIONS, key))):
        responded = _respond(client, handshake, sender)
    now = client._now()
    with client.store.transaction() as txn:
        kept = txn.message(message.get("id"))
        if kept is not None:
            return kept
        record = txn.get(SESSIONS, key)
        known = _known(record)
        if handshake is not None:
            # A handshake's envelope opens in the session it started: kept
            # (a later message of the same handshake), or started now.
            candidates = [s for s, e in known if e == ephemeral]
            if not candidates and responded is not None:
                candidates = [responded]
        else:
            candidates = [s for s, _ in known]
        if not candidates:
            raise MessageRefused("this device has no session with the sender's device (the "
                                 "message was sealed in a session it never had, or lost)")
        seen = txn.get(SEEN, chat_id)
        counters = Counters.load(seen) if seen is not None else Counters()
        for n, used in enumerate(candidates):
            try:
                opened = sessionmessages.open_message(message, used, now, counters=counters,
                                                      direct_members=direct_members)
                break
            except MessageRefused:
                if n == len(candidates) - 1:
                    raise
        started = used is responded
        used_ephemeral = ephemeral if started else next(e for s, e in known if s is used)
        me, peer = (client.cyphr_id, client.device_id), (sender, device_id)
        if record is None or (used is not known[0][0] and _promote(record, used_ephemeral,
                                                                  started, me, peer)):
            # The session the peer uses now becomes the one to send with;
            # the other is kept as the one before, to open what was sealed
            # in it.
            demoted = [{"state": s.export(), "ephemeral": e} for s, e in known if s is not used]
            txn.put(SESSIONS, key, _session_record(used, None, used_ephemeral,
                                                   demoted[0] if demoted else None))
        elif used is not known[0][0]:
            # Kept as the one before: the current one stays (see _promote).
            txn.put(SESSIONS, key, dict(record, previous={"state": used.export(),
                                                          "ephemeral": used_ephemeral}))
        else:
            _, kept_handshake = _loaded(record)
            txn.put(SESSIONS, key, _session_record(used, kept_handshake, record.get("ephemeral"),
                                                   record.get("previous")))
        txn.put(SEEN, chat_id, counters.export())
        header = opened.header
        kept = {"id": message.get("id"), "chatId": chat_id, "seq": message.get("seq"),
                "senderId": sender, "senderDeviceId": device_id,
                "messageType": header.message_type, "clientMessageId": header.client_message_id,
                "text": opened.plaintext.decode("utf-8", errors="replace"),
                "sentAt": header.sent_at, "timestamp": message.get("timestamp"),
                "missing": len(opened.arrival.missing) if opened.arrival else 0}
        txn.add_message(kept)
    if started:
        client.erase_one_time_session_prekeys(handshake)
    return kept


def _check_roster(client: Client, message: dict[str, Any]) -> None:
    """Before anything is opened: a message naming a roster is refused
    unless that epoch's state of the group's roster has that hash, with the
    sender a member then (the header is authenticated by the opening that
    follows: one altered does not open)."""
    payload = message.get("encryptedPayload")
    header = payload.get("header") if isinstance(payload, dict) else None
    if not isinstance(header, dict) or header.get("rosterEpoch") is None:
        return
    claimed = BodyHeader.from_json(header)
    try:
        groups.check_message(client, str(message.get("chatId")), str(message.get("senderId")),
                             claimed.roster_epoch, claimed.roster_hash)
    except RosterRefused as e:
        raise MessageRefused(f"the message's roster is not the group's: {e.reason}") from None


def _own_copy(txn: Any, message: dict[str, Any]) -> dict[str, Any]:
    """A message this device sent, as the server gives it back (to another
    process on the profile, before the sending one kept it): the copy kept
    before it was sent."""
    pending = txn.get(PENDING, str(message.get("clientMessageId")))
    if pending is None:
        raise MessageRefused("this device sent it, and kept no copy of it")
    kept = {**pending, "id": message.get("id"), "chatId": message.get("chatId"),
            "seq": message.get("seq"), "timestamp": message.get("timestamp")}
    kept.pop("counter", None)
    kept.pop("firstDirect", None)
    txn.add_message(kept)
    return kept


def shown_time(record: dict[str, Any]) -> str:
    """The time to show: the sender's clock, which a server re-dating the
    message cannot change."""
    return iso_ms(int(record["sentAt"]))
