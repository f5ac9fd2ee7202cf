"""
Group rosters the server cannot forge (issue #22, item 4; the protocol only).

A group's state (its members and their roles, a commitment to its name key,
its epoch) is a chain of changes. Each change names the hash of the state it
changes and is signed, under the label ``cyphr-v2 roster-change``, by the
identity key of an admin of that state; the first change (the genesis) by
its creator, whom it makes its first admin. The server stores and orders the
chain; a client checks every change from the genesis with the identity keys
it pinned, so a member the server adds without a signed change is never a
member. A message's header names the epoch of the roster its sender sealed
to and that roster's hash, which the reader checks.

Shared by the server and the client: nothing here does I/O or imports
either of them. docs/encryption.rst ("Group rosters") specifies every
encoding byte for byte; tests/vectors/rosters-v1.json holds vectors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, Optional

from nacl.signing import SigningKey

from cyphr.signing import (ED25519_SIGNATURE_BYTES, ROSTER, EncodingError, Reader, opaque,
                           sign_with_label, text, uint8, uint64, vector, verify_with_label)

ADMIN, MEMBER = "admin", "member"
_ROLE_CODES = {MEMBER: 1, ADMIN: 2}
_ROLES_BY_CODE = {code: role for role, code in _ROLE_CODES.items()}

ADD, REMOVE, SET_ROLE = 1, 2, 3
_KINDS = {ADD: "add", REMOVE: "remove", SET_ROLE: "set role"}

HASH_BYTES = 32
NAME_KEY_BYTES = 32
NO_PREVIOUS = bytes(HASH_BYTES)  # what a genesis names as its previous state

STATE_LABEL = "cyphr-v2 roster-state"
HASH_LABEL = "cyphr-v2 roster-hash"
NAME_KEY_LABEL = "cyphr-v2 roster name-key"
NAME_AAD_LABEL = "cyphr-v2 group-name"
SIGNED_LABEL = "cyphr-v2 signed-roster-change"

# Limits when reading a change from the network: far above any real group,
# low enough that a hostile one costs little to refuse.
MAX_ID_LENGTH = 64
MAX_OPERATIONS = 10_000
MAX_CHANGE_BYTES = 1 << 20

IdentityKeys = Callable[[str], Optional[bytes]]


class RosterRefused(Exception):
    """A roster change, name key or message that the chain does not allow."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _id_bytes(cyphr_id: str) -> bytes:
    return cyphr_id.encode("utf-8")


# -- operations ---------------------------------------------------------------

@dataclass(frozen=True)
class Operation:
    """One step of a change: add a member with a role, remove a member, or
    set a member's role. ``role`` is None for a removal."""

    kind: int
    cyphr_id: str
    role: str | None = None

    def encode(self) -> bytes:
        """``uint8(kind) || text(cyphr_id) || uint8(role)``: kind 1 add, 2
        remove, 3 set role; role 1 member, 2 admin, 0 for a removal."""
        if self.kind not in _KINDS:
            raise EncodingError(f"no roster operation of kind {self.kind}")
        if not self.cyphr_id:
            raise EncodingError("a roster operation names no one")
        if (self.role is None) != (self.kind == REMOVE) or (
                self.role is not None and self.role not in _ROLE_CODES):
            raise EncodingError(f"a {_KINDS[self.kind]} with role {self.role!r}")
        return uint8(self.kind) + text(self.cyphr_id) + uint8(_ROLE_CODES.get(self.role or "", 0))


def add(cyphr_id: str, role: str = MEMBER) -> Operation:
    return Operation(ADD, cyphr_id, role)


def remove(cyphr_id: str) -> Operation:
    return Operation(REMOVE, cyphr_id)


def set_role(cyphr_id: str, role: str) -> Operation:
    return Operation(SET_ROLE, cyphr_id, role)


# -- the state ----------------------------------------------------------------

@dataclass(frozen=True)
class RosterState:
    """A group's roster at one epoch, as the chain makes it. Immutable:
    :func:`apply` returns a new state and leaves this one as it was."""

    chat_id: str
    epoch: int  # 1 for the genesis
    members: Mapping[str, str]  # Cyphr ID -> ADMIN or MEMBER
    name_key_commitment: bytes  # name_key_commitment(chat_id, name_key_epoch, key)
    previous_hash: bytes  # the state this one follows; NO_PREVIOUS for the genesis
    name_key_epoch: int  # the epoch whose change set the current name key

    def __post_init__(self) -> None:
        ordered = sorted(self.members.items(), key=lambda item: _id_bytes(item[0]))
        object.__setattr__(self, "members", MappingProxyType(dict(ordered)))

    def encode(self) -> bytes:
        """The canonical encoding, members sorted by Cyphr ID as bytes."""
        if any(role not in _ROLE_CODES for role in self.members.values()):
            raise EncodingError("a member's role is neither admin nor member")
        if len(self.previous_hash) != HASH_BYTES \
                or len(self.name_key_commitment) != HASH_BYTES:
            raise EncodingError("a roster's hashes are 32 bytes each")
        return (text(STATE_LABEL) + text(self.chat_id) + uint64(self.epoch)
                + opaque(self.previous_hash)
                + vector(text(m) + uint8(_ROLE_CODES[r]) for m, r in self.members.items())
                + uint64(self.name_key_epoch) + opaque(self.name_key_commitment))

    def state_hash(self) -> bytes:
        """The roster hash a message header carries with this epoch."""
        return hashlib.sha256(text(HASH_LABEL) + opaque(self.encode())).digest()

    def admins(self) -> frozenset[str]:
        return frozenset(m for m, role in self.members.items() if role == ADMIN)


def ghosts(state: RosterState, claimed: Iterable[str]) -> frozenset[str]:
    """The accounts a server lists as members that the roster does not
    have: the client seals nothing to them and shows them as such."""
    return frozenset(claimed) - frozenset(state.members)


# -- the change ---------------------------------------------------------------

class _Reader(Reader):
    def count(self, maximum: int) -> int:
        n = int.from_bytes(self._take(4), "big")
        if n > maximum:
            raise EncodingError(f"{n} items are more than {maximum}")
        return n


@dataclass(frozen=True)
class RosterChange:
    """One link of the chain, signed by its author's identity key."""

    chat_id: str
    epoch: int  # the new state's: the previous state's + 1; 1 for the genesis
    previous_hash: bytes  # the hash of the state it changes; NO_PREVIOUS for the genesis
    author: str
    operations: tuple[Operation, ...]
    name_key_commitment: bytes | None  # a new name key's commitment, or None to keep it
    created_at: int  # ms since the Unix epoch, the author's clock (shown, not checked)

    def content(self) -> bytes:
        """``text(chat_id) || uint64(epoch) || opaque(previous_hash) ||
        text(author) || uint64(created_at) || vector(operations) ||
        opaque(name_key_commitment or empty)``."""
        if self.epoch < 1:
            raise EncodingError(f"roster epoch {self.epoch} is not 1 or more")
        if len(self.previous_hash) != HASH_BYTES:
            raise EncodingError("the previous roster hash is not 32 bytes")
        commitment = self.name_key_commitment
        if commitment is not None and len(commitment) != HASH_BYTES:
            raise EncodingError("a name-key commitment is 32 bytes")
        if not self.chat_id or not self.author:
            raise EncodingError("a roster change names its chat and its author")
        return (text(self.chat_id) + uint64(self.epoch) + opaque(self.previous_hash)
                + text(self.author) + uint64(self.created_at)
                + vector(op.encode() for op in self.operations) + opaque(commitment or b""))

    @classmethod
    def decode(cls, content: bytes) -> RosterChange:
        """The change of ``content``, read strictly: the decoded change
        encodes to exactly these bytes, or EncodingError."""
        r = _Reader(content)
        chat_id, epoch, previous_hash = r.text(MAX_ID_LENGTH), r.uint64(), r.opaque(HASH_BYTES)
        author, created_at = r.text(MAX_ID_LENGTH), r.uint64()
        operations = []
        for _ in range(r.count(MAX_OPERATIONS)):
            kind, cyphr_id, code = r.uint8(), r.text(MAX_ID_LENGTH), r.uint8()
            if code not in _ROLES_BY_CODE and code != 0:
                raise EncodingError(f"no role {code}")
            operations.append(Operation(kind, cyphr_id, _ROLES_BY_CODE.get(code)))
        commitment = r.opaque(HASH_BYTES)
        r.end()
        change = cls(chat_id, epoch, previous_hash, author, tuple(operations),
                     commitment or None, created_at)
        if change.content() != content:  # also checks every field's rules
            raise EncodingError("the roster change is not in its canonical encoding")
        return change

    def sign(self, signing_key: SigningKey) -> bytes:
        return sign_with_label(signing_key, ROSTER, self.content())

    def verify(self, identity_key: bytes, signature: bytes) -> bool:
        try:
            content = self.content()
        except EncodingError:
            return False
        return verify_with_label(identity_key, ROSTER, content, signature)


@dataclass(frozen=True)
class SignedChange:
    """A change and its author's signature, as a system message carries it
    and the server stores it: ``text("cyphr-v2 signed-roster-change") ||
    opaque(content) || opaque(signature)``."""

    change: RosterChange
    signature: bytes

    def encode(self) -> bytes:
        return text(SIGNED_LABEL) + opaque(self.change.content()) + opaque(self.signature)

    @classmethod
    def decode(cls, data: bytes) -> SignedChange:
        r = Reader(data)
        if r.text(64) != SIGNED_LABEL:
            raise EncodingError("not a signed roster change")
        change, signature = RosterChange.decode(r.opaque(MAX_CHANGE_BYTES)), r.opaque(64)
        r.end()
        if len(signature) != ED25519_SIGNATURE_BYTES:
            raise EncodingError("a roster change's signature is 64 bytes")
        return cls(change, signature)


def genesis(chat_id: str, creator: str, members: Mapping[str, str],
            name_key_commitment: bytes, created_at: int) -> RosterChange:
    """The first change of a group: it adds ``creator`` as its first admin,
    then each of ``members`` (Cyphr ID -> role, the creator not among
    them) in the order of their Cyphr IDs as bytes."""
    if creator in members:
        raise ValueError("the genesis adds its creator itself, as an admin")
    others = sorted(members, key=_id_bytes)
    return RosterChange(chat_id, 1, NO_PREVIOUS, creator,
                        (add(creator, ADMIN),) + tuple(add(m, members[m]) for m in others),
                        name_key_commitment, created_at)


def next_change(state: RosterState, author: str, operations: Iterable[Operation],
                name_key_commitment: bytes | None, created_at: int) -> RosterChange:
    """A change that follows ``state``: the next epoch, chained to its hash."""
    return RosterChange(state.chat_id, state.epoch + 1, state.state_hash(), author,
                        tuple(operations), name_key_commitment, created_at)


# -- checking and applying ----------------------------------------------------

def _chain_checks(state: RosterState | None, change: RosterChange, chat_id: str | None) -> None:
    expected_chat = state.chat_id if state is not None else chat_id
    if expected_chat is not None and change.chat_id != expected_chat:
        raise RosterRefused(f"the change is for chat {change.chat_id!r}, not {expected_chat!r}")
    if state is None:
        if change.epoch != 1:
            raise RosterRefused(f"epoch {change.epoch} with no roster before it: a chain "
                                "starts with a genesis, epoch 1")
        if change.previous_hash != NO_PREVIOUS:
            raise RosterRefused("not chained: a genesis names 32 zero bytes before it")
        return
    if change.epoch != state.epoch + 1:
        raise RosterRefused(f"epoch {change.epoch} does not follow epoch {state.epoch}")
    if change.previous_hash != state.state_hash():
        raise RosterRefused(f"not chained: the previous hash is not the hash of epoch "
                            f"{state.epoch}")


def _authority_checks(state: RosterState | None, change: RosterChange) -> None:
    if state is None:
        ops = change.operations
        if not ops or ops[0] != add(change.author, ADMIN):
            raise RosterRefused("a genesis adds its author first, as an admin")
        if any(op.kind != ADD for op in ops):
            raise RosterRefused("a genesis only adds members")
    elif state.members.get(change.author) != ADMIN:
        raise RosterRefused(f"{change.author} is not an admin of epoch {state.epoch}")


def _apply_operations(state: RosterState | None, change: RosterChange) -> dict[str, str]:
    members = dict(state.members) if state is not None else {}
    named: set[str] = set()
    for op in change.operations:
        if op.cyphr_id in named:
            raise RosterRefused(f"the change names {op.cyphr_id} twice")
        named.add(op.cyphr_id)
        present = op.cyphr_id in members
        if op.kind == ADD:
            if present:
                raise RosterRefused(f"{op.cyphr_id} is already a member")
            members[op.cyphr_id] = op.role  # type: ignore[assignment]
        elif not present:
            raise RosterRefused(f"{op.cyphr_id} is not a member")
        elif op.kind == REMOVE:
            if op.cyphr_id == change.author:
                # The remover picks the new name key, so it would keep it.
                raise RosterRefused("an author cannot remove itself: another admin removes it")
            del members[op.cyphr_id]
        elif members[op.cyphr_id] == op.role:
            raise RosterRefused(f"{op.cyphr_id} already has the role {op.role}")
        else:
            members[op.cyphr_id] = op.role  # type: ignore[assignment]
    # Never empty: the author, an admin, cannot remove itself.
    if ADMIN not in members.values():
        raise RosterRefused("the change removes or demotes the last admin")
    return members


def apply(state: RosterState | None, change: RosterChange, signature: bytes,
          identity_keys: IdentityKeys, *, chat_id: str | None = None) -> RosterState:
    """The state after ``change``, signed by ``signature``, checked against
    ``state`` (None for the genesis) and the identity keys ``identity_keys``
    gives (a client's pins; the server's registered keys). RosterRefused
    says why a change is refused; ``state`` is never altered. ``chat_id``,
    when given, is the chat a genesis must be for."""
    try:
        change.content()
    except EncodingError as e:
        raise RosterRefused(f"a malformed change: {e}") from None
    _chain_checks(state, change, chat_id)
    key = identity_keys(change.author)
    if key is None:
        raise RosterRefused(f"no identity key is known for {change.author}")
    if not change.verify(key, signature):
        raise RosterRefused(f"the signature of {change.author} does not verify")
    _authority_checks(state, change)
    if not change.operations and change.name_key_commitment is None:
        raise RosterRefused("the change changes nothing")
    members = _apply_operations(state, change)
    commitment = change.name_key_commitment
    if state is None:
        if commitment is None:
            raise RosterRefused("a genesis commits to the group's first name key")
        return RosterState(change.chat_id, 1, members, commitment, NO_PREVIOUS, 1)
    if commitment == state.name_key_commitment:
        raise RosterRefused("the new name-key commitment is the current one")
    if commitment is None and any(op.kind == REMOVE for op in change.operations):
        raise RosterRefused("a removal without a new name-key commitment")
    if commitment is None:
        return RosterState(state.chat_id, change.epoch, members, state.name_key_commitment,
                           change.previous_hash, state.name_key_epoch)
    return RosterState(state.chat_id, change.epoch, members, commitment,
                       change.previous_hash, change.epoch)


def verify_chain(changes: Iterable[SignedChange], identity_keys: IdentityKeys, *,
                 chat_id: str | None = None) -> RosterState:
    """The state at the end of a chain, checked change by change from its
    genesis; RosterRefused at the first change refused (naming its place)."""
    state: RosterState | None = None
    for place, signed in enumerate(changes, 1):
        try:
            state = apply(state, signed.change, signed.signature, identity_keys,
                          chat_id=chat_id)
        except RosterRefused as e:
            raise RosterRefused(f"change {place} of the chain: {e.reason}") from None
    if state is None:
        raise RosterRefused("an empty chain: a roster starts with a genesis")
    return state


# -- name keys ----------------------------------------------------------------

def name_key_commitment(chat_id: str, epoch: int, key: bytes) -> bytes:
    """What a roster change commits to for a new name key: binds the key to
    its chat and to the epoch of the change that sets it. Reveals nothing of
    the key (32 random bytes), which never appears in a roster."""
    if len(key) != NAME_KEY_BYTES:
        raise ValueError("a group-name key is 32 bytes")
    return hashlib.sha256(text(NAME_KEY_LABEL) + text(chat_id) + uint64(epoch)
                          + opaque(key)).digest()


def check_name_key(state: RosterState, key: bytes) -> None:
    """Refuses a name key that is not the one the roster commits to: a key
    no admin set, another chat's, or one of another epoch (before a removal)."""
    if len(key) != NAME_KEY_BYTES or name_key_commitment(
            state.chat_id, state.name_key_epoch, key) != state.name_key_commitment:
        raise RosterRefused(f"the name key is not the one epoch {state.epoch} of this chat "
                            "commits to")


def name_aad(state: RosterState) -> bytes:
    """The associated data of the group's name sealed under its name key:
    ``text("cyphr-v2 group-name") || text(chat_id) || uint64(name_key_epoch)``."""
    return text(NAME_AAD_LABEL) + text(state.chat_id) + uint64(state.name_key_epoch)


# -- messages -----------------------------------------------------------------

def check_message_roster(state_by_epoch: Mapping[int, RosterState], epoch: int | None,
                         roster_hash: bytes | None, sender: str | None = None) -> RosterState:
    """The roster a group message was sealed to, after checking its header's
    ``rosterEpoch`` and ``rosterHash`` against the states the reader holds
    (and, given ``sender``, that the sender was a member at that epoch)."""
    if epoch is None or roster_hash is None:
        raise RosterRefused("a group message names no roster epoch and hash")
    state = state_by_epoch.get(epoch)
    if state is None:
        raise RosterRefused(f"roster epoch {epoch} is unknown")
    if roster_hash != state.state_hash():
        raise RosterRefused(f"the roster hash does not match epoch {epoch}")
    if sender is not None and sender not in state.members:
        raise RosterRefused(f"{sender} is not a member at epoch {epoch}")
    return state
