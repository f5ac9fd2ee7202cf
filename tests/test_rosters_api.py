"""
Group rosters on the server (issue #22, item 4): /api/chats/:chatId/roster
takes a group's signed changes in epoch order, checks each as a client does,
makes the group's members follow it, and hands the chain to members; the
unsigned member API no longer changes such a group. Every refusal changes
nothing. On both engines, with real Ed25519 signatures.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.trial.unittest import TestCase

from cyphr import rosters
from cyphr.rosters import RosterState, SignedChange
from cyphr.store.chats import ChatStore
from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, start_server
from tests.users import User

NOW = 1_790_000_000_000


class RostersMixin:
    async def setUp(self) -> None:
        self.server = await start_server(self)
        self.http = InProcessHTTP.for_server(self.server)
        self.users = {}
        for name in ("alice", "bob", "carol", "dave"):
            self.users[name] = User(name)
            await self.users[name].register(self.http)
        chats = ChatStore(self.server.database)
        for other in ("bob", "carol", "dave"):
            await chats.direct_chat("alice", other, 0)
        response = await self.http.post("/api/messaging/create-group", {"members": ["bob", "carol"]},
                                        headers=self.users["alice"].auth())
        assert response.code in (200, 201), response.body
        self.chat_id = response.json()["chatId"]
        self.state: RosterState | None = None

    def keys(self, cyphr_id: str) -> bytes:
        return bytes(self.users[cyphr_id].signing_key.verify_key)

    def signed(self, change: rosters.RosterChange, by: str | None = None) -> SignedChange:
        signer = self.users[by or change.author].signing_key
        return SignedChange(change, change.sign(signer))

    async def post(self, signed: SignedChange, caller: str | None = None) -> Any:
        return await self.http.post(
            f"/api/chats/{self.chat_id}/roster",
            {"change": base64.b64encode(signed.encode()).decode()},
            headers=self.users[caller or signed.change.author].auth())

    async def accepted(self, change: rosters.RosterChange) -> RosterState:
        signed = self.signed(change)
        response = await self.post(signed)
        self.assertEqual(response.code, 201, response.body)
        self.assertEqual(response.json()["epoch"], change.epoch)
        self.state = rosters.apply(self.state, change, signed.signature, self.keys)
        return self.state

    async def members(self) -> dict[str, str]:
        rows = await self.server.database.run_query(
            "SELECT user_id, role FROM chat_participants WHERE chat_id = ?", (self.chat_id,))
        return dict(rows)

    async def chain(self, caller: str = "alice") -> Any:
        return await self.http.get(f"/api/chats/{self.chat_id}/roster",
                                   headers=self.users[caller].auth())

    def key_commitment(self, epoch: int) -> bytes:
        return rosters.name_key_commitment(self.chat_id, epoch, os.urandom(32))

    async def genesis(self) -> RosterState:
        return await self.accepted(rosters.genesis(
            self.chat_id, "alice", {"bob": rosters.MEMBER, "carol": rosters.MEMBER},
            self.key_commitment(1), NOW))

    async def refused(self, response: Any, status: int, code: str) -> dict[str, Any]:
        self.assertEqual((response.code, response.json().get("code")), (status, code), response.body)
        return response.json()

    async def test_a_chain_the_members_follow(self) -> None:
        """The first change, an addition, a promotion and a removal with a
        new name key: each taken in turn, the group's members follow, and
        every member gets the chain, which checks from the start with the
        members' keys alone; the unsigned member API is then refused, but a
        member may still leave."""
        await self.genesis()
        self.assertEqual(await self.members(), {"alice": "admin", "bob": "member", "carol": "member"})
        await self.accepted(rosters.next_change(self.state, "alice", [rosters.add("dave")], None, NOW))
        await self.accepted(rosters.next_change(self.state, "alice",
                                                [rosters.set_role("bob", rosters.ADMIN)], None, NOW))
        await self.accepted(rosters.next_change(self.state, "bob", [rosters.remove("carol")],
                                                self.key_commitment(4), NOW))
        self.assertEqual(await self.members(), {"alice": "admin", "bob": "admin", "dave": "member"})
        answer = (await self.chain("dave")).json()
        self.assertEqual(answer["epoch"], 4)
        changes = [SignedChange.decode(base64.b64decode(c)) for c in answer["changes"]]
        self.assertEqual(rosters.verify_chain(changes, self.keys, chat_id=self.chat_id), self.state)
        unsigned = await self.http.post(f"/api/chats/{self.chat_id}/members/carol", {},
                                        headers=self.users["alice"].auth())
        await self.refused(unsigned, 409, "ROSTER_IN_USE")
        role = await self.http.put(f"/api/chats/{self.chat_id}/members/dave/role",
                                   {"role": "admin"}, headers=self.users["alice"].auth())
        await self.refused(role, 409, "ROSTER_IN_USE")
        left = await self.http.delete(f"/api/chats/{self.chat_id}/members/dave",
                                      headers=self.users["dave"].auth())
        self.assertEqual(left.code, 200, left.body)
        refused = await self.chain("dave")
        await self.refused(refused, 404, "CHAT_NOT_FOUND")

    async def test_refusals_change_nothing(self) -> None:
        """A change signed by a member who is no admin, one not chained to
        the current state, one for another epoch, one the caller did not
        sign, one that adds a stranger, a first change that is not the
        group as it is, and bytes that are no change: each refused with its
        code and reason; the chain and the members stay as they were."""
        first = rosters.genesis(self.chat_id, "alice", {"bob": rosters.MEMBER}, self.key_commitment(1),
                                NOW)
        json = await self.refused(await self.post(self.signed(first)), 409, "ROSTER_REFUSED")
        self.assertIn("as they are", json["details"]["reason"])
        by_member = rosters.genesis(self.chat_id, "bob", {"alice": rosters.MEMBER,
                                                           "carol": rosters.MEMBER},
                                    self.key_commitment(1), NOW)
        await self.refused(await self.post(self.signed(by_member)), 409, "ROSTER_REFUSED")
        await self.genesis()
        before = (await self.members(), (await self.chain()).json())
        not_admin = rosters.next_change(self.state, "bob", [rosters.add("dave")], None, NOW)
        json = await self.refused(await self.post(self.signed(not_admin)), 409, "ROSTER_REFUSED")
        self.assertIn("not an admin", json["details"]["reason"])
        unchained = rosters.RosterChange(self.chat_id, 2, os.urandom(32), "alice",
                                         (rosters.add("dave"),), None, NOW)
        await self.refused(await self.post(self.signed(unchained)), 409, "ROSTER_REFUSED")
        later = rosters.RosterChange(self.chat_id, 3, self.state.state_hash(), "alice",
                                     (rosters.add("dave"),), None, NOW)
        json = await self.refused(await self.post(self.signed(later)), 409, "ROSTER_CONFLICT")
        self.assertEqual(json["details"], {"epoch": 1})
        relayed = rosters.next_change(self.state, "alice", [rosters.add("dave")], None, NOW)
        await self.refused(await self.post(self.signed(relayed), caller="bob"), 409, "ROSTER_REFUSED")
        forged = self.signed(relayed, by="bob")  # alice's change, bob's signature
        await self.refused(await self.post(forged, caller="alice"), 409, "ROSTER_REFUSED")
        stranger = User("erin")
        await stranger.register(self.http)
        self.users["erin"] = stranger
        unknown = rosters.next_change(self.state, "alice", [rosters.add("erin")], None, NOW)
        await self.refused(await self.post(self.signed(unknown)), 404, "USER_NOT_FOUND")
        garbage = await self.http.post(f"/api/chats/{self.chat_id}/roster", {"change": "AAAA"},
                                       headers=self.users["alice"].auth())
        await self.refused(garbage, 400, "INVALID_FIELD")
        outsider = await self.http.post(f"/api/chats/{self.chat_id}/roster", {"change": "AAAA"},
                                        headers=self.users["dave"].auth())
        await self.refused(outsider, 404, "CHAT_NOT_FOUND")
        self.assertEqual((await self.members(), (await self.chain()).json()), before)

    async def test_a_direct_chat_has_no_roster(self) -> None:
        chats = await self.http.get("/api/messaging/chats", headers=self.users["bob"].auth())
        direct = [c["chatId"] for c in chats.json()["chats"] if c["chatType"] == "direct"][0]
        response = await self.http.get(f"/api/chats/{direct}/roster", headers=self.users["bob"].auth())
        await self.refused(response, 400, "NOT_A_GROUP")


class SQLiteRostersTests(SQLiteMixin, RostersMixin, TestCase):
    pass


class PostgresRostersTests(PostgresMixin, RostersMixin, TestCase):
    async def test_two_changes_for_one_epoch(self) -> None:
        """Two admins' changes for the same epoch at once: one is taken,
        the other is 409 ROSTER_CONFLICT, and the members follow the one
        taken."""
        await self.genesis()
        await self.accepted(rosters.next_change(self.state, "alice",
                                                [rosters.set_role("bob", rosters.ADMIN)], None, NOW))
        mine = rosters.next_change(self.state, "alice", [rosters.add("dave")], None, NOW)
        theirs = rosters.next_change(self.state, "bob", [rosters.remove("carol")],
                                     self.key_commitment(3), NOW)
        from twisted.internet.defer import DeferredList, ensureDeferred
        results = await DeferredList([ensureDeferred(self.post(self.signed(mine))),
                                      ensureDeferred(self.post(self.signed(theirs)))])
        codes = sorted(r.code for _, r in results)
        self.assertEqual(codes, [201, 409])
        members = await self.members()
        self.assertTrue(("dave" in members) != ("carol" not in members), members)
