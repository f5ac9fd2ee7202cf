"""
Group rosters (docs/encryption.rst, "Group rosters"; cyphr.rosters): a
group's chain of signed changes, which its members fetch and check from
the start with the keys they pinned, and the server's own list of the
group's members made to follow it.

The server checks each change as a client does (its signature by the
identity key of an admin of the state it names by hash, its epoch, its
operations), so that an honest server's member list is the chain's; but
it cannot make a change, and a client that follows the chain never counts
a member the server added on its own. The first change of a group must
list its members as they are; an added member must be a contact of the
change's author, as for the unsigned API, which a group with a roster no
longer takes (409 ROSTER_IN_USE; a member may still leave).
"""

from __future__ import annotations

from typing import Any

from cyphr.changes import ChangeFeed, MemberJoined, MemberLeft, RoleChanged
from cyphr.clock import now_ms
from cyphr.cpu import CpuPool
from cyphr.errors import (
    CHAT_NOT_FOUND,
    NOT_A_GROUP,
    ROSTER_CONFLICT,
    ROSTER_REFUSED,
    USER_NOT_FOUND,
    BadRequest,
    Conflict,
    NotFound,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.ratelimit import RateLimit
from cyphr.handlers.validation import invalid
from cyphr.rosters import RosterRefused, RosterState, SignedChange, apply
from cyphr.signing import EncodingError
from cyphr.store.chats import ChatStore
from cyphr.store.identities import IdentityStore
from cyphr.store.rosters import RosterConflict, RosterStore, StoredChange


def _refused(reason: str) -> Conflict:
    return Conflict(f"The roster change is refused: {reason}", code=ROSTER_REFUSED,
                    details={"reason": reason})


class RostersHandler:
    def __init__(self, rosters: RosterStore, chats: ChatStore, identities: IdentityStore,
                 cpu: CpuPool, changes: ChangeFeed, clock: Any, *, change_limit: RateLimit) -> None:
        self._rosters = rosters
        self._chats = chats
        self._identities = identities
        self._cpu = cpu
        self._changes = changes
        self._clock = clock
        self._change_limit = change_limit

    async def _group(self, user: AuthUser, chat_id: str) -> None:
        membership = await self._chats.membership(chat_id, user.cyphr_id)
        if membership is None:
            raise NotFound("No such chat", code=CHAT_NOT_FOUND)
        if membership.chat.chat_type != "group":
            raise BadRequest("A direct chat has no roster", code=NOT_A_GROUP)

    async def chain(self, user: AuthUser, chat_id: str) -> list[StoredChange]:
        """The group's changes from the first, for one of its members."""
        await self._group(user, chat_id)
        return await self._rosters.chain(chat_id)

    async def append(self, user: AuthUser, chat_id: str, data: bytes) -> int:
        """Take the next change of the group's roster, signed by ``user``;
        answer its epoch."""
        await self._group(user, chat_id)
        self._change_limit.hit(user.user_id)
        try:
            signed = SignedChange.decode(data)
        except (RosterRefused, EncodingError, ValueError) as e:
            raise invalid("change", f"change is not a signed roster change: {e}") from None
        change = signed.change
        if change.author != user.cyphr_id:
            raise _refused("it is signed by another member than the caller")
        chain = await self._rosters.chain(chat_id)
        if change.epoch != len(chain) + 1:
            raise Conflict(f"The roster is at epoch {len(chain)}: fetch it and make the change "
                           f"again", code=ROSTER_CONFLICT, details={"epoch": len(chain)})
        author = await self._identities.by_cyphr_id(user.cyphr_id)
        if author is None:
            raise NotFound("No such chat", code=CHAT_NOT_FOUND)

        def check() -> tuple[RosterState | None, RosterState]:
            state = None
            for stored in chain:
                earlier = SignedChange.decode(stored.change)
                state = apply(state, earlier.change, earlier.signature,
                              lambda _, key=stored.author_key: key, chat_id=chat_id)
            return state, apply(state, change, signed.signature, lambda _: author.public_key,
                                chat_id=chat_id)

        try:
            previous, state = await self._cpu.run(check)
        except RosterRefused as e:
            raise _refused(e.reason) from None
        await self._check_members(user, chat_id, previous, state)
        before = dict(previous.members) if previous is not None else {}
        # What the change does, not the whole state: a member who left on
        # its own stays out until an admin's change removes it.
        added = {m: role for m, role in state.members.items() if m not in before}
        removed = [m for m in before if m not in state.members]
        roles = {m: role for m, role in state.members.items() if m in before and before[m] != role}
        if previous is None:  # the members as they are, with the roles it gives them
            now_roles = {m.cyphr_id: m.role for m in await self._chats.members(chat_id)}
            added = {}
            roles = {m: role for m, role in state.members.items() if now_roles.get(m) != role}
        try:
            followed = await self._rosters.append(chat_id, change.epoch, data, user.cyphr_id,
                                                  author.public_key, added, removed, roles,
                                                  now_ms(self._clock))
        except RosterConflict as e:
            raise Conflict(f"The roster is at epoch {e.epoch}: fetch it and make the change again",
                           code=ROSTER_CONFLICT, details={"epoch": e.epoch}) from None
        for cyphr_id, joined_seq in followed.added:
            self._changes.publish(MemberJoined(chat_id, cyphr_id, joined_seq))
        for cyphr_id in followed.removed:
            self._changes.publish(MemberLeft(chat_id, cyphr_id))
        for cyphr_id, role in followed.roles:
            self._changes.publish(RoleChanged(chat_id, cyphr_id, role))
        return change.epoch

    async def _check_members(self, user: AuthUser, chat_id: str, previous: RosterState | None,
                             state: RosterState) -> None:
        members = {m.cyphr_id: m.role for m in await self._chats.members(chat_id)}
        if previous is None:
            # The first change describes the group as it is; its author
            # must be an admin of it.
            if set(state.members) != set(members):
                raise _refused("the first change must list the group's members as they are")
            if members.get(user.cyphr_id) != "admin":
                raise _refused("the first change must be signed by an admin of the group")
            return
        added = sorted(set(state.members) - set(previous.members))
        if added:
            partners = await self._chats.direct_partners(user.cyphr_id, added)
            strangers = [cyphr_id for cyphr_id in added if cyphr_id not in partners]
            if strangers:
                raise NotFound("No such user", code=USER_NOT_FOUND, details={"members": strangers})
