"""
Groups with signed rosters on the client (docs/encryption.rst, "Group
rosters"; cyphr.rosters): functions of a :class:`~cyphr.client.client.Client`.

A group made by this client gets a roster at once: its first change, signed
by the creator, lists the members, and every later change (an addition, a
removal, a role) is signed by an admin of the state before it. The client
checks the server's chain from the first change with the identity keys it
pinned, every time it uses it, and keeps what it checked in the local
store (``rosters``): a server that rewrites a group's past is caught, as
is a change no admin of its state signed.

What the roster decides:

- **who is sealed to**: the roster's members, of those the server lists;
  a member the server lists that the roster does not (a ghost) gets an
  envelope of random bytes, and is named in ``Client.ghost_members`` and
  a warning;
- **which name key counts**: a key sent in the group is kept only if the
  roster commits to it (bound to the chat and the epoch that set it), so a
  member who is no admin cannot replace the name; a removal brings a new
  key, sent to those who stay;
- **which messages are the group's**: a message names its roster's epoch
  and hash, which must be the hash of that epoch's state, from a sender who
  was a member then.

A group made before rosters (no change on the server) keeps the unsigned
member routes, and its messages carry no roster.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import TYPE_CHECKING

from cyphr import rosters
from cyphr.client.http import ApiError, ClientError, segment
from cyphr.rosters import RosterRefused, RosterState, SignedChange
from cyphr.signing import EncodingError

if TYPE_CHECKING:
    from cyphr.client.client import Client

_log = logging.getLogger(__name__)

ROSTERS = "rosters"   # local store: chat id -> {"changes": [base64 signed change, ...]}


def states(client: Client, chat_id: str, *, fresh: bool = True) -> list[RosterState]:
    """The group's roster states by epoch (epoch n at index n - 1), the
    chain checked from the first change with the pinned identity keys;
    empty for a group without a roster. ``fresh``: fetched from the server
    (else what this process checked last, when it has it)."""
    cached = client._rosters.get(chat_id)
    if cached is not None and not fresh:
        return cached
    answer = client._call("GET", f"/api/chats/{segment(chat_id)}/roster")
    changes = answer.get("changes")
    if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
        raise ClientError(f"the server's roster of group {chat_id} is malformed")
    kept = (client.store.get(ROSTERS, chat_id) or {}).get("changes", [])
    if changes[:len(kept)] != kept:
        raise ClientError(f"the server's roster of group {chat_id} is not the one this device "
                          f"checked before: it rewrote the group's past; not using it")
    found: list[RosterState] = []
    state = None
    try:
        for data in changes:
            signed = SignedChange.decode(base64.b64decode(data, validate=True))
            state = rosters.apply(state, signed.change, signed.signature, client._sender_key,
                                  chat_id=chat_id)
            found.append(state)
    except (RosterRefused, EncodingError, ValueError) as e:
        raise ClientError(f"the roster of group {chat_id} is refused: {e}") from None
    if len(changes) > len(kept):
        client.store.put(ROSTERS, chat_id, {"changes": changes})
    client._rosters[chat_id] = found
    return found


def current(client: Client, chat_id: str) -> RosterState | None:
    found = states(client, chat_id)
    return found[-1] if found else None


def _post(client: Client, chat_id: str, change: rosters.RosterChange) -> None:
    signed = SignedChange(change, change.sign(client.identity.signing_key))
    client._call("POST", f"/api/chats/{segment(chat_id)}/roster",
                 {"change": base64.b64encode(signed.encode()).decode("ascii")})


ANNOUNCED = "roster"  # a system message's field: {"epoch", "change"} of a change its author made


def announce(client: Client, chat_id: str, epoch: int) -> None:
    """Tell the group, in a sealed system message, of the change of ``epoch``
    this device made: members see it, and each checks that the server's
    chain holds the same change (a new member: that the state that added it
    is the one its adder signed). Best effort: the chain is on the server
    anyway."""
    kept = (client.store.get(ROSTERS, chat_id) or {}).get("changes", [])
    if len(kept) < epoch:
        return
    content = {ANNOUNCED: {"epoch": epoch, "change": kept[epoch - 1]}}
    try:
        client._send(chat_id, json.dumps(content).encode("utf-8"), "system")
    except ClientError as e:
        _log.warning("Could not tell group %s of its roster change: %s", chat_id, e)


def check_announced(client: Client, chat_id: str, sender: object, content: object) -> str:
    """What an announced change did, as a person reads it, once checked:
    the server's chain holds the same change at that epoch, signed by the
    sender. ClientError otherwise."""
    if not isinstance(content, dict) or type(content.get("epoch")) is not int \
            or not isinstance(content.get("change"), str):
        raise ClientError("a malformed roster announcement")
    epoch, announced = content["epoch"], content["change"]
    found = states(client, chat_id, fresh=False)
    if len(found) < epoch:
        found = states(client, chat_id)
    kept = (client.store.get(ROSTERS, chat_id) or {}).get("changes", [])
    if epoch < 1 or len(kept) < epoch or kept[epoch - 1] != announced:
        raise ClientError(f"{sender} announced a roster change for epoch {epoch} that is not the "
                          f"server's: the server shows this group another roster than its admins "
                          f"made")
    change = SignedChange.decode(base64.b64decode(announced)).change
    if change.author != sender:
        raise ClientError(f"{sender} announced a roster change {change.author} made")
    return describe(change)


def describe(change: rosters.RosterChange) -> str:
    """A change as a person reads it."""
    if change.epoch == 1:
        others = [op.cyphr_id for op in change.operations if op.cyphr_id != change.author]
        return f"{change.author} made the group with {', '.join(others) or 'nobody else'}"
    done = []
    for op in change.operations:
        if op.kind == rosters.ADD:
            done.append(f"added {op.cyphr_id}" + (" as an admin" if op.role == rosters.ADMIN else ""))
        elif op.kind == rosters.REMOVE:
            done.append(f"removed {op.cyphr_id}")
        else:
            done.append(f"made {op.cyphr_id} {'an admin' if op.role == rosters.ADMIN else 'a member'}")
    key = " (a new name key)" if change.name_key_commitment is not None else ""
    return f"{change.author} {', '.join(done)}{key}"


def create(client: Client, encrypted_name: str, name_key: bytes, members: list[str]) -> str:
    """A new group with its roster's first change; its id."""
    me = client.cyphr_id
    answer = client._call("POST", "/api/messaging/create-group",
                          {"encryptedName": encrypted_name, "members": members})
    chat_id = answer["chatId"]
    others = {m: rosters.MEMBER for m in set(members) - {me}}
    _post(client, chat_id, rosters.genesis(
        chat_id, me, others, rosters.name_key_commitment(chat_id, 1, name_key), client._now()))
    return chat_id


def change(client: Client, chat_id: str, operations: list[rosters.Operation],
           new_name_key: bytes | None = None) -> RosterState:
    """Sign and post the next change of the group's roster (made again
    once on the state now when another admin's change came first)."""
    for attempt in (1, 2):
        state = current(client, chat_id)
        if state is None:
            raise ClientError(f"group {chat_id} has no roster")
        commitment = None if new_name_key is None else rosters.name_key_commitment(
            chat_id, state.epoch + 1, new_name_key)
        try:
            _post(client, chat_id, rosters.next_change(state, client.cyphr_id, operations,
                                                       commitment, client._now()))
        except ApiError as e:
            if e.code != "ROSTER_CONFLICT" or attempt == 2:
                raise
            continue
        return states(client, chat_id)[-1]
    raise AssertionError("unreachable")


def new_name_key() -> bytes:
    return os.urandom(rosters.NAME_KEY_BYTES)


def name_key_counts(client: Client, chat_id: str, key: bytes) -> bool:
    """Whether ``key`` may be kept as the group's name key: always for a
    group without a roster; else only the key its roster commits to."""
    found = states(client, chat_id)
    if not found:
        return True
    try:
        rosters.check_name_key(found[-1], key)
    except RosterRefused as e:
        for earlier in found[:-1]:
            try:
                rosters.check_name_key(earlier, key)
            except RosterRefused:
                continue
            return False  # an earlier epoch's (old history): replaced since
        _log.warning("Refused a name key for group %s: %s", chat_id, e.reason)
        return False
    return True


def may_name(client: Client, chat_id: str, sender: object) -> bool:
    """Whether ``sender`` may tell the group's name: an admin of its
    roster, or anyone in a group without one."""
    state = current(client, chat_id)
    return state is None or sender in state.admins()


def recipients(client: Client, chat_id: str, listed: list[str]
               ) -> tuple[list[str], list[str], RosterState | None]:
    """Of the members the server lists, those to seal to and the ghosts
    (listed, not in the roster), with the roster; all of them and no ghost
    for a group without a roster."""
    if chat_id in client._not_groups:
        return listed, [], None
    try:
        state = current(client, chat_id)
    except ApiError as e:
        if e.code != "NOT_A_GROUP":
            raise
        client._not_groups.add(chat_id)
        return listed, [], None
    if state is None:
        return listed, [], None
    members = [m for m in listed if m in state.members]
    ghosts = sorted(rosters.ghosts(state, listed))
    for ghost in ghosts:
        _log.warning("Group %s: the server lists %s, whom its roster does not: not sealing to it",
                     chat_id, ghost)
    return members, ghosts, state


def check_message(client: Client, chat_id: str, sender: str, epoch: int | None,
                  roster_hash: bytes | None) -> None:
    """RosterRefused unless a message naming roster ``epoch`` and
    ``roster_hash`` is one of the group's: that epoch's state has that
    hash, and ``sender`` was a member then. A message naming no roster is
    taken (sent before the group had one, or by a client without rosters)."""
    if epoch is None:
        return
    found = states(client, chat_id, fresh=False)
    if len(found) < epoch:
        found = states(client, chat_id)
    rosters.check_message_roster({s.epoch: s for s in found}, epoch, roster_hash, sender)

