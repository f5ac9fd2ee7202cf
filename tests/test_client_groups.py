"""
Groups with signed rosters in the reference client (issue #22, item 4):
the roster decides who is sealed to, which name key counts and which
messages are the group's. The demonstrations of the review become
regression tests: the ghost member (an account the server adds to a group
reads nothing, and the sender is told), the name-key takeover (a member who
is no admin cannot replace the name or its key), a message whose roster
hash does not match its epoch, and a server that rewrites a group's past.
A real server over a real port, on both engines.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os

from twisted.trial.unittest import TestCase

from cyphr.client import groups, render, sessionbook
from cyphr.client.client import Client
from cyphr.client.http import ClientError
from cyphr.store.chats import ChatStore
from tests.clients import ServedClients
from tests.helpers import PostgresMixin, SQLiteMixin


class ClientGroupsMixin(ServedClients):
    async def friends(self, *names: str) -> list[Client]:
        """Registered users, the first a contact of each of the others."""
        clients = [await self.registered(name) for name in names]
        chats = ChatStore(self.server.database)
        for other in names[1:]:
            await chats.direct_chat(names[0], other, 0)
        return clients

    async def texts(self, reader: Client, chat_id: str) -> list[str | None]:
        return [m.text for m in await self.thread(reader.history, chat_id)
                if m.message_type != "system"]

    async def name(self, reader: Client, chat_id: str) -> str | None:
        return {c["chatId"]: c["name"] for c in await self.thread(reader.chats)}[chat_id]

    async def test_a_group_follows_its_roster(self) -> None:
        """Alice makes a group with bob and carol: its roster's first change
        is on the server, and everyone reads the name and the messages.
        She adds dave, who reads what follows and the name; she removes
        carol, with a new name key, which bob and dave get and carol does
        not; she makes bob an admin, and bob's change goes through."""
        alice, bob, carol, dave = await self.friends("alice", "bob", "carol", "dave")
        chat_id = await self.thread(alice.create_group, "the plan", ["bob", "carol"])
        roster = await self.thread(alice._call, "GET", f"/api/chats/{chat_id}/roster")
        self.assertEqual(roster["epoch"], 1)
        await self.thread(alice.send, chat_id, "one")
        for reader in (bob, carol):
            self.assertEqual(await self.texts(reader, chat_id), ["one"])
            self.assertEqual(await self.name(reader, chat_id), "the plan")
        await self.thread(alice.add_member, chat_id, "dave")
        await self.thread(alice.send, chat_id, "two")
        self.assertEqual((await self.texts(dave, chat_id))[-1], "two")
        self.assertEqual(await self.name(dave, chat_id), "the plan")
        carol_key = carol.profile.vault["groupKeys"][chat_id]
        await self.thread(alice.remove_member, chat_id, "carol")
        await self.thread(alice.send, chat_id, "three")
        for reader in (bob, dave):
            self.assertEqual((await self.texts(reader, chat_id))[-1], "three")
            self.assertNotEqual(reader.profile.vault["groupKeys"][chat_id], carol_key)
            self.assertEqual(await self.name(reader, chat_id), "the plan")
        self.assertEqual(carol.profile.vault["groupKeys"][chat_id], carol_key)
        await self.thread(alice.set_role, chat_id, "bob", "admin")
        await self.thread(bob.remove_member, chat_id, "dave")
        members = await self.thread(alice.members, chat_id)
        self.assertEqual(sorted((m["cyphrId"], m["role"]) for m in members),
                         [("alice", "admin"), ("bob", "admin")])
        await self.thread(bob.send, chat_id, "four")
        self.assertEqual((await self.texts(alice, chat_id))[-1], "four")

    async def test_changes_are_shown_and_checked(self) -> None:
        """Every change of a roster is announced in the group, and shown to
        its members as what it did; a member whose server hides the change
        that added it sees what was sealed for that epoch refused, saying
        so."""
        alice, bob, carol, dave = await self.friends("alice", "bob", "carol", "dave")
        chat_id = await self.thread(alice.create_group, "watched", ["bob", "carol"])
        await self.thread(alice.add_member, chat_id, "dave")
        await self.thread(alice.set_role, chat_id, "bob", "admin")
        await self.thread(alice.remove_member, chat_id, "carol")
        shown = [render.line(m, "bob") for m in await self.thread(bob.history, chat_id)
                 if render.visible(m)]
        self.assertEqual([line.split("] ", 1)[1] for line in shown], [
            "— alice made the group with bob, carol —", "— alice added dave —",
            "— alice made bob an admin —", "— alice removed carol (a new name key) —"])
        # The server drops the last change: erin, added next, is told of a
        # roster its admin never made.
        erin = await self.registered("erin")
        await ChatStore(self.server.database).direct_chat("alice", "erin", 0)
        await self.thread(alice.add_member, chat_id, "erin")
        await self.server.database.run_operation(
            "DELETE FROM group_rosters WHERE chat_id = ? AND epoch = 5", (chat_id,))
        refused = [m for m in await self.thread(erin.history, chat_id)
                   if m.message_type == "system" and m.text is None]
        # Sealed for the epoch that added her, which the server no longer shows.
        self.assertTrue(refused)
        self.assertIn("roster epoch 5 is unknown", refused[0].error)

    async def test_the_ghost_member(self) -> None:
        """The server puts mallory in alice's group without any signed
        change: alice's message is sealed to bob only (mallory's device
        gets random bytes), she is told who the ghost is, and mallory reads
        nothing; bob reads it."""
        alice, bob, mallory = await self.friends("alice", "bob", "mallory")
        chat_id = await self.thread(alice.create_group, "no ghosts", ["bob"])
        await self.server.database.run_operation(
            "INSERT INTO chat_participants (chat_id, user_id, role, joined_at, read_up_to_seq,"
            " delivered_up_to_seq, joined_seq) VALUES (?, 'mallory', 'member', 0, 0, 0, 0)",
            (chat_id,))
        sent = await self.thread(alice.send, chat_id, "for members only")
        self.assertEqual(alice.ghost_members, ["mallory"])
        self.assertIn(("mallory", 1, "not a member of the group's roster"), alice.refused_devices)
        got = {m.id: m for m in await self.thread(mallory.history, chat_id)}
        self.assertIsNone(got[sent["messageId"]].text)
        self.assertEqual((await self.texts(bob, chat_id))[-1], "for members only")

    async def test_the_name_key_takeover(self) -> None:
        """Bob, a member but no admin, sends the group a name key of his own,
        then the right key with another name: neither is taken by alice or
        carol, who keep the key and name alice gave."""
        alice, bob, carol = await self.friends("alice", "bob", "carol")
        chat_id = await self.thread(alice.create_group, "the real name", ["bob", "carol"])
        await self.thread(carol.history, chat_id)
        key = carol.profile.vault["groupKeys"][chat_id]
        forged = base64.b64encode(os.urandom(32)).decode()
        for content in ({"groupKey": forged, "groupName": "hijacked"},
                        {"groupKey": key, "groupName": "hijacked"}):
            await self.thread(bob._send, chat_id, json.dumps(content).encode(), "system")
        for reader in (alice, carol):
            await self.thread(reader.history, chat_id)
            self.assertEqual(reader.profile.vault["groupKeys"][chat_id], key)
            self.assertEqual(await self.name(reader, chat_id), "the real name")

    async def test_a_message_whose_roster_hash_does_not_match(self) -> None:
        """Bob sends a message naming the group's epoch with another hash
        (a roster of his own making): alice refuses it, saying so."""
        alice, bob = await self.friends("alice", "bob")
        chat_id = await self.thread(alice.create_group, "checked", ["bob"])
        state = await self.thread(groups.current, bob, chat_id)
        forged = dataclasses.replace(state, previous_hash=os.urandom(32))
        target, _, members = await self.thread(bob._target, chat_id)
        sent = await self.thread(
            sessionbook.send, bob, target, chat_id, members, b"from a forged roster", "text",
            lambda body: bob._call("POST", "/api/messaging/send", body), roster=forged)
        got = {m.id: m for m in await self.thread(alice.history, chat_id)}
        self.assertIsNone(got[sent["messageId"]].text)
        self.assertIn("roster is not the group's", got[sent["messageId"]].error)

    async def test_a_server_that_rewrites_the_past(self) -> None:
        """Once alice's client has checked a group's roster, a server that
        answers another chain (a change taken out) is refused."""
        alice, bob, carol = await self.friends("alice", "bob", "carol")
        chat_id = await self.thread(alice.create_group, "history", ["bob"])
        await self.thread(alice.add_member, chat_id, "carol")
        await self.server.database.run_operation(
            "DELETE FROM group_rosters WHERE chat_id = ? AND epoch = 2", (chat_id,))
        with self.assertRaises(ClientError) as raised:
            await self.thread(alice.send, chat_id, "never sent")
        self.assertIn("rewrote the group's past", str(raised.exception))


class SQLiteClientGroupsTests(SQLiteMixin, ClientGroupsMixin, TestCase):
    pass


class PostgresClientGroupsTests(PostgresMixin, ClientGroupsMixin, TestCase):
    pass
