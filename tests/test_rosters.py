"""
Group rosters the server cannot forge (cyphr.rosters; issue #22, item 4,
the protocol): a chain of admin-signed changes verified from its genesis,
every refusal of apply with its reason (the state left as it was), the two
demonstrated attacks (the ghost member, the name-key takeover), the check
of a message's roster epoch and hash, the byte layouts as
docs/encryption.rst gives them, and tests/vectors/rosters-v1.json rebuilt
byte for byte. Real Ed25519 (PyNaCl), no server, no mocks.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Callable

from nacl.signing import SigningKey
from twisted.trial.unittest import SynchronousTestCase

from cyphr import rosters, signing
from cyphr.rosters import (
    ADMIN,
    MEMBER,
    NO_PREVIOUS,
    RosterChange,
    RosterRefused,
    RosterState,
    SignedChange,
    add,
    apply,
    check_message_roster,
    check_name_key,
    genesis,
    ghosts,
    name_aad,
    name_key_commitment,
    next_change,
    remove,
    set_role,
    verify_chain,
)
from cyphr.signing import EncodingError

VECTORS = json.loads((Path(__file__).parent / "vectors" / "rosters-v1.json").read_text("utf-8"))
CHAT = "0b8e4f8a-54a3-4f5e-a1f7-2f0f5e0c9a11"
OTHER_CHAT = "7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"
NOW = 1_790_000_000_000
NAMES = ("alice", "bob", "carol", "dave", "mallory")
KEYS = {name: SigningKey(hashlib.sha256(name.encode()).digest()) for name in NAMES}
PINS = {name: bytes(key.verify_key) for name, key in KEYS.items()}
NAME_KEY_1, NAME_KEY_4 = bytes([1]) * 32, bytes([4]) * 32


def pinned(who: str) -> bytes | None:
    """A client's pins: every test identity's real key."""
    return PINS.get(who)


def signed(change: RosterChange, by: str | None = None) -> SignedChange:
    return SignedChange(change, change.sign(KEYS[by or change.author]))


def honest_chain() -> list[SignedChange]:
    """alice's group with bob and carol (epoch 1); alice adds dave (2) and
    makes bob an admin (3); bob removes carol with a new name key (4)."""
    first = genesis(CHAT, "alice", {"bob": MEMBER, "carol": MEMBER},
                    name_key_commitment(CHAT, 1, NAME_KEY_1), NOW)
    chain = [signed(first)]
    state = verify_chain(chain, pinned)
    for author, ops, key in (("alice", [add("dave")], None),
                             ("alice", [set_role("bob", ADMIN)], None),
                             ("bob", [remove("carol")], NAME_KEY_4)):
        commitment = None if key is None else name_key_commitment(CHAT, state.epoch + 1, key)
        chain.append(signed(next_change(state, author, ops, commitment, NOW + state.epoch)))
        state = verify_chain(chain, pinned)
    return chain


def states_of(chain: list[SignedChange]) -> dict[int, RosterState]:
    states: dict[int, RosterState] = {}
    state = None
    for link in chain:
        state = apply(state, link.change, link.signature, pinned)
        states[state.epoch] = state
    return states


class ChainTests(SynchronousTestCase):
    def test_a_chain_verifies(self) -> None:
        """Genesis, an addition, a role change and a removal with a new name
        key verify from the start to the state they describe."""
        state = verify_chain(honest_chain(), pinned, chat_id=CHAT)
        self.assertEqual(dict(state.members), {"alice": ADMIN, "bob": ADMIN, "dave": MEMBER})
        self.assertEqual((state.chat_id, state.epoch, state.name_key_epoch), (CHAT, 4, 4))
        self.assertEqual(state.admins(), {"alice", "bob"})
        check_name_key(state, NAME_KEY_4)

    def test_each_state_names_the_one_before(self) -> None:
        """Each state's previous hash is the hash of the state before it;
        the genesis names 32 zero bytes; every hash differs."""
        states = states_of(honest_chain())
        self.assertEqual(states[1].previous_hash, NO_PREVIOUS)
        for epoch in (2, 3, 4):
            self.assertEqual(states[epoch].previous_hash, states[epoch - 1].state_hash())
        self.assertEqual(len({s.state_hash() for s in states.values()}), 4)

    def test_the_name_key_stays_until_rotated(self) -> None:
        """Additions and role changes keep the name key (and its epoch)."""
        states = states_of(honest_chain())
        for epoch in (1, 2, 3):
            self.assertEqual(states[epoch].name_key_epoch, 1)
            check_name_key(states[epoch], NAME_KEY_1)

    def test_a_genesis_of_another_chat(self) -> None:
        """A client reading chat CHAT refuses a chain made for another."""
        self.assertRaisesRegex(RosterRefused, "change 1 of the chain: the change is for chat",
                               verify_chain, honest_chain(), pinned, chat_id=OTHER_CHAT)

    def test_an_empty_chain(self) -> None:
        """A chain with no genesis is no roster."""
        self.assertRaisesRegex(RosterRefused, "an empty chain", verify_chain, [], pinned)


class RefusalTests(SynchronousTestCase):
    """Each refusal says why and leaves the state as it was: the honest
    next change still applies to it afterwards."""

    def setUp(self) -> None:
        self.chain = honest_chain()
        self.states = states_of(self.chain)
        self.state = self.states[3]  # alice and bob admins; carol and dave members
        self.hash = self.state.state_hash()

    def refused(self, change: RosterChange, reason: str, by: str | None = None,
                state: RosterState | None | str = "current",
                keys: Callable[[str], bytes | None] = pinned) -> None:
        before = self.state if state == "current" else state
        error = self.assertRaises(RosterRefused, apply, before, change,
                                  change.sign(KEYS[by or change.author]), keys)
        self.assertIn(reason, error.reason)
        self.assertEqual(self.state.state_hash(), self.hash)
        honest = self.chain[3]
        self.assertEqual(apply(self.state, honest.change, honest.signature, pinned),
                         self.states[4])

    def change(self, author: str, *ops: rosters.Operation, key: bytes | None = None,
               **fields: object) -> RosterChange:
        commitment = None if key is None else name_key_commitment(CHAT, 4, key)
        return replace(next_change(self.state, author, ops, commitment, NOW), **fields)

    def test_signed_by_a_non_admin(self) -> None:
        """A member who is not an admin of the previous state cannot change it."""
        self.refused(self.change("carol", add("mallory")), "carol is not an admin of epoch 3")

    def test_a_signature_that_does_not_verify(self) -> None:
        """A change in an admin's name, signed by another key."""
        self.refused(self.change("alice", add("mallory")), "the signature of alice does not "
                     "verify", by="mallory")

    def test_an_author_with_no_pinned_key(self) -> None:
        """An author the client has no identity key for is refused, not trusted."""
        self.refused(self.change("alice", add("mallory")), "no identity key is known for alice",
                     keys=lambda who: None)

    def test_not_chained(self) -> None:
        """A change naming an older state, or any other hash, as its previous."""
        self.refused(self.change("alice", add("mallory"),
                                 previous_hash=self.states[2].state_hash()), "not chained")
        self.refused(self.change("alice", add("mallory"), previous_hash=bytes([7]) * 32),
                     "not chained")

    def test_an_epoch_that_does_not_follow(self) -> None:
        """An epoch that skips one, or repeats the current one, is refused."""
        self.refused(self.change("alice", add("mallory"), epoch=5),
                     "epoch 5 does not follow epoch 3")
        self.refused(self.change("alice", add("mallory"), epoch=3),
                     "epoch 3 does not follow epoch 3")

    def test_another_chat(self) -> None:
        """A change made for another chat does not apply to this one."""
        self.refused(self.change("alice", add("mallory"), chat_id=OTHER_CHAT),
                     f"the change is for chat {OTHER_CHAT!r}")

    def test_operations_that_make_no_sense(self) -> None:
        """Adding a member already there, removing or setting the role of one
        not there, setting a role a member already has, naming one member
        twice, or changing nothing: refused."""
        for ops, reason in (([add("dave")], "dave is already a member"),
                            ([remove("mallory")], "mallory is not a member"),
                            ([set_role("mallory", ADMIN)], "mallory is not a member"),
                            ([set_role("dave", MEMBER)], "dave already has the role member"),
                            ([add("mallory"), set_role("mallory", ADMIN)],
                             "names mallory twice"),
                            ([], "changes nothing")):
            self.refused(self.change("alice", *ops), reason)

    def test_the_last_admin(self) -> None:
        """Removing or demoting the last admin is refused; an author never
        removes itself, so a group never becomes empty."""
        self.refused(self.change("alice", set_role("bob", MEMBER), set_role("alice", MEMBER)),
                     "the last admin")
        self.refused(self.change("alice", remove("bob"), set_role("alice", MEMBER),
                                 key=bytes([9]) * 32), "the last admin")
        self.refused(self.change("alice", remove("alice"), remove("bob"), remove("carol"),
                                 remove("dave"), key=bytes([9]) * 32),
                     "an author cannot remove itself")

    def test_a_removal_without_a_new_name_key(self) -> None:
        """A removal must commit to a new name key, not keep or repeat the current one."""
        self.refused(self.change("alice", remove("carol")),
                     "a removal without a new name-key commitment")
        self.refused(self.change("alice", remove("carol"),
                                 name_key_commitment=self.state.name_key_commitment),
                     "the new name-key commitment is the current one")

    def test_a_malformed_change(self) -> None:
        """Fields that do not encode (so could not have been signed) are
        refused before anything else."""
        for change in (self.change("alice", add("mallory"), previous_hash=b"short"),
                       self.change("alice", add("mallory", "owner")),
                       self.change("alice", add("mallory"), epoch=0)):
            self.assertRaisesRegex(RosterRefused, "a malformed change", apply, self.state,
                                   change, bytes(64), pinned)
        self.assertEqual(self.state.state_hash(), self.hash)

    def test_the_genesis_rules(self) -> None:
        """A genesis comes first, names no previous state, adds its author
        first as an admin, only adds, and commits to a name key."""
        good = self.chain[0].change
        for change, reason in (
                (replace(good, operations=(add("bob", ADMIN), add("alice", ADMIN))),
                 "a genesis adds its author first, as an admin"),
                (replace(good, operations=(add("alice", MEMBER), add("bob", ADMIN))),
                 "a genesis adds its author first, as an admin"),
                (replace(good, operations=good.operations + (remove("bob"),)),
                 "a genesis only adds members"),
                (replace(good, name_key_commitment=None),
                 "a genesis commits to the group's first name key"),
                (replace(good, previous_hash=bytes([1]) * 32), "not chained"),
                (replace(good, epoch=2), "a chain starts with a genesis")):
            self.refused(change, reason, state=None)
        self.refused(good, "epoch 1 does not follow epoch 3")  # a genesis cannot restart


class GhostMemberTests(SynchronousTestCase):
    """The ghost member: an account the server puts in a group without any
    change an admin signed. A client that follows the chain never counts it."""

    def test_a_member_the_server_lists_is_not_a_member(self) -> None:
        """The server's member list names mallory; the chain, which the
        server stores but cannot forge, does not: she is a ghost, and the
        client seals to the chain's members only."""
        server_says = ["alice", "bob", "dave", "mallory"]
        state = verify_chain(honest_chain(), pinned, chat_id=CHAT)
        self.assertNotIn("mallory", state.members)
        self.assertEqual(ghosts(state, server_says), {"mallory"})

    def test_the_server_cannot_write_her_into_the_chain(self) -> None:
        """Every change the server can make adding mallory is refused: in
        an admin's name, signed by a key the server holds (the client checks
        with the key it pinned for that admin, whatever key the server hands
        out for her), or in mallory's own name (she is no admin)."""
        chain = honest_chain()
        state = verify_chain(chain, pinned)
        forged = next_change(state, "alice", [add("mallory", ADMIN)], None, NOW)
        self.assertRaisesRegex(RosterRefused, "change 5 of the chain: the signature of alice "
                               "does not verify", verify_chain,
                               chain + [signed(forged, by="mallory")], pinned)
        self.assertRaisesRegex(RosterRefused, "change 5 of the chain: mallory is not an admin",
                               verify_chain, chain + [signed(replace(forged, author="mallory"))],
                               pinned)
        self.assertEqual(verify_chain(chain, pinned), state)

    def test_a_chain_altered_by_the_server(self) -> None:
        """Dropping a change from the middle, reordering two, or changing a
        stored change's members breaks the chain at that place."""
        chain = honest_chain()
        self.assertRaisesRegex(RosterRefused, "change 2 of the chain: epoch 3 does not follow",
                               verify_chain, [chain[0]] + chain[2:], pinned)
        self.assertRaisesRegex(RosterRefused, "change 2 of the chain: epoch 3",
                               verify_chain, [chain[0], chain[2], chain[1]], pinned)
        altered = SignedChange(replace(chain[1].change, operations=(add("mallory"),)),
                               chain[1].signature)
        self.assertRaisesRegex(RosterRefused, "change 2 of the chain: the signature",
                               verify_chain, [chain[0], altered], pinned)

    def test_a_chain_of_the_servers_own(self) -> None:
        """A genesis in alice's name the server signed is refused. A whole
        chain of its own for the chat (mallory, an account it controls,
        its creator) verifies, but shows mallory as the creator, and a real
        member's message, whose header names the true roster's hash, is
        refused against it: the split view shows at the first message."""
        fake = genesis(CHAT, "alice", {"mallory": MEMBER}, bytes(32), NOW)
        self.assertRaisesRegex(RosterRefused, "signature of alice does not verify",
                               verify_chain, [signed(fake, by="mallory")], pinned)
        own = genesis(CHAT, "mallory", {"alice": MEMBER, "bob": MEMBER}, bytes(32), NOW)
        split = verify_chain([signed(own)], pinned, chat_id=CHAT)
        self.assertEqual((split.admins(), own.author), ({"mallory"}, "mallory"))
        true = states_of(honest_chain())
        self.assertRaisesRegex(RosterRefused, "does not match epoch 1", check_message_roster,
                               {1: split}, 1, true[1].state_hash(), "alice")


class NameKeyTests(SynchronousTestCase):
    """The name-key takeover: only an admin sets the name key, it changes
    at every removal, and it is bound to its chat and epoch."""

    def setUp(self) -> None:
        self.states = states_of(honest_chain())

    def test_a_non_admin_cannot_replace_the_name_key(self) -> None:
        """dave, a member, cannot set a new name-key commitment, and his own
        key is not the group's."""
        state = self.states[3]
        mine = bytes([0x66]) * 32
        change = next_change(state, "dave", [], name_key_commitment(CHAT, 4, mine), NOW)
        self.assertRaisesRegex(RosterRefused, "dave is not an admin", apply, state, change,
                               change.sign(KEYS["dave"]), pinned)
        # Nor can dave pass his own key off as the group's.
        self.assertRaisesRegex(RosterRefused, "not the one epoch 3 of this chat commits to",
                               check_name_key, state, mine)

    def test_an_admin_may_rotate_the_name_key_alone(self) -> None:
        """A change with only a new commitment, by an admin, rotates the key."""
        state = self.states[4]
        key = bytes([0x77]) * 32
        change = next_change(state, "bob", [], name_key_commitment(CHAT, 5, key), NOW)
        after = apply(state, change, change.sign(KEYS["bob"]), pinned)
        self.assertEqual(after.name_key_epoch, 5)
        check_name_key(after, key)

    def test_a_key_of_another_chat_or_epoch(self) -> None:
        """The right key bytes bound to another chat, and the key from
        before the removal, are refused; the current key is taken."""
        now = self.states[4]
        check_name_key(now, NAME_KEY_4)
        for state, key in ((now, NAME_KEY_1), (self.states[3], NAME_KEY_4),
                           (replace(now, chat_id=OTHER_CHAT), NAME_KEY_4),
                           (replace(now, name_key_epoch=3), NAME_KEY_4), (now, NAME_KEY_4[:31])):
            self.assertRaises(RosterRefused, check_name_key, state, key)
        self.assertNotEqual(name_key_commitment(CHAT, 4, NAME_KEY_4),
                            name_key_commitment(OTHER_CHAT, 4, NAME_KEY_4))
        self.assertRaises(ValueError, name_key_commitment, CHAT, 4, b"short")

    def test_the_name_key_changes_at_every_removal(self) -> None:
        """The removal changed the commitment; a removal without one is refused."""
        self.assertNotEqual(self.states[4].name_key_commitment,
                            self.states[3].name_key_commitment)
        change = next_change(self.states[4], "alice", [remove("dave")], None, NOW)
        self.assertRaisesRegex(RosterRefused, "a removal without a new name-key commitment",
                               apply, self.states[4], change, change.sign(KEYS["alice"]), pinned)

    def test_the_name_aad_binds_chat_and_epoch(self) -> None:
        """The sealed name's associated data names the chat and the key's epoch."""
        state = self.states[4]
        self.assertEqual(name_aad(state), struct.pack(
            ">I19sI36sQ", 19, b"cyphr-v2 group-name", 36, CHAT.encode(), 4))
        self.assertNotEqual(name_aad(state), name_aad(self.states[3]))
        self.assertNotEqual(name_aad(state), name_aad(replace(state, chat_id=OTHER_CHAT)))


class MessageRosterTests(SynchronousTestCase):
    """A message header's rosterEpoch and rosterHash, checked by readers."""

    def setUp(self) -> None:
        self.states = states_of(honest_chain())

    def test_the_hash_of_its_epoch(self) -> None:
        """A message naming an epoch and that state's hash, from a member of
        it, is taken and its state returned."""
        for epoch, state in self.states.items():
            self.assertIs(check_message_roster(self.states, epoch, state.state_hash(), "alice"),
                          state)

    def test_a_hash_that_does_not_match_its_epoch(self) -> None:
        """Another epoch's hash, another chat's or fork's state at the same
        epoch, an unknown epoch, or no roster at all: refused."""
        fork = replace(self.states[4], members={"alice": ADMIN, "mallory": MEMBER})
        for epoch, roster_hash, reason in (
                (4, self.states[3].state_hash(), "does not match epoch 4"),
                (4, fork.state_hash(), "does not match epoch 4"),
                (4, replace(self.states[4], chat_id=OTHER_CHAT).state_hash(),
                 "does not match epoch 4"),
                (5, self.states[4].state_hash(), "roster epoch 5 is unknown"),
                (None, None, "names no roster epoch and hash"),
                (4, None, "names no roster epoch and hash")):
            self.assertRaisesRegex(RosterRefused, reason, check_message_roster, self.states,
                                   epoch, roster_hash)

    def test_a_sender_who_was_not_a_member(self) -> None:
        """carol at epoch 4 (after her removal) and dave at epoch 1 (before
        he joined) are refused; carol at epoch 3 is not."""
        for epoch, sender in ((4, "carol"), (1, "dave")):
            self.assertRaisesRegex(RosterRefused, f"{sender} is not a member at epoch {epoch}",
                                   check_message_roster, self.states, epoch,
                                   self.states[epoch].state_hash(), sender)
        check_message_roster(self.states, 3, self.states[3].state_hash(), "carol")


class EncodingTests(SynchronousTestCase):
    """The layouts of docs/encryption.rst, and strict decoding."""

    def setUp(self) -> None:
        self.chain = honest_chain()

    def test_round_trip(self) -> None:
        """A signed change, and a change's content, decode to what was encoded."""
        for link in self.chain:
            self.assertEqual(SignedChange.decode(link.encode()), link)
            self.assertEqual(RosterChange.decode(link.change.content()), link.change)

    def test_strict(self) -> None:
        """Trailing bytes, another label, a short signature, a role on a
        removal, an unknown kind or role, a short commitment: refused."""
        link = self.chain[3]
        data = link.encode()
        content = link.change.content()
        self.assertIn(b"\x02\x00\x00\x00\x05carol\x00", content)
        for bad in (data + b"\x00", data.replace(b"signed-roster-change", b"signed-roster-chang3"),
                    SignedChange(link.change, link.signature[:63]).encode(), data[:-1]):
            self.assertRaises(EncodingError, SignedChange.decode, bad)
        for old, new in ((b"\x02\x00\x00\x00\x05carol\x00", b"\x02\x00\x00\x00\x05carol\x01"),
                         (b"\x02\x00\x00\x00\x05carol\x00", b"\x09\x00\x00\x00\x05carol\x00"),
                         (b"\x02\x00\x00\x00\x05carol\x00", b"\x02\x00\x00\x00\x05carol\x07")):
            self.assertRaises(EncodingError, RosterChange.decode, content.replace(old, new))
        commitment = link.change.name_key_commitment or b""
        self.assertRaises(EncodingError, RosterChange.decode,
                          content[:-36] + struct.pack(">I", 31) + commitment[:31])

    def test_change_layout(self) -> None:
        """A change's content and signing input, written out with struct; a
        change keeping the name key ends with an empty commitment."""
        change = self.chain[3].change
        expected = (struct.pack(">I36sQI", 36, CHAT.encode(), 4, 32) + change.previous_hash
                    + struct.pack(">I3sQI", 3, b"bob", NOW + 3, 1)
                    + struct.pack(">BI5sB", 2, 5, b"carol", 0)
                    + struct.pack(">I", 32) + name_key_commitment(CHAT, 4, NAME_KEY_4))
        self.assertEqual(change.content(), expected)
        self.assertEqual(signing.sign_content(signing.ROSTER, expected),
                         struct.pack(">I22sI", 22, b"cyphr-v2 roster-change", len(expected))
                         + expected)
        kept = next_change(verify_chain(self.chain, pinned), "alice", [add("erin", ADMIN)],
                           None, 0)
        self.assertTrue(kept.content().endswith(struct.pack(">BI4sBI", 1, 4, b"erin", 2, 0)))

    def test_state_layout_and_hash(self) -> None:
        """Members sorted by Cyphr ID as UTF-8 bytes, each with its role."""
        state = RosterState(CHAT, 2, {"\u00e9mile": MEMBER, "zed": ADMIN, "Zoe": MEMBER},
                            bytes([5]) * 32, bytes([6]) * 32, 1)
        self.assertEqual(list(state.members), ["Zoe", "zed", "\u00e9mile"])
        encoding = (struct.pack(">I21sI36sQI", 21, b"cyphr-v2 roster-state", 36, CHAT.encode(),
                                2, 32) + bytes([6]) * 32
                    + struct.pack(">II3sBI3sBI6sB", 3, 3, b"Zoe", 1, 3, b"zed", 2,
                                  6, "\u00e9mile".encode(), 1)
                    + struct.pack(">QI", 1, 32) + bytes([5]) * 32)
        self.assertEqual(state.encode(), encoding)
        self.assertEqual(state.state_hash(), hashlib.sha256(
            struct.pack(">I20sI", 20, b"cyphr-v2 roster-hash", len(encoding))
            + encoding).digest())
        self.assertEqual(name_key_commitment(CHAT, 3, NAME_KEY_4), hashlib.sha256(
            struct.pack(">I24sI36sQI", 24, b"cyphr-v2 roster name-key", 36, CHAT.encode(),
                        3, 32) + NAME_KEY_4).digest())

    def test_a_roster_signature_is_no_other_kind(self) -> None:
        """A change's signature verifies under roster-change only."""
        link = self.chain[1]
        content = link.change.content()
        for label in signing.LABELS:
            self.assertEqual(
                signing.verify_with_label(PINS["alice"], label, content, link.signature),
                label == signing.ROSTER, label)
        self.assertFalse(link.change.verify(PINS["bob"], link.signature))
        self.assertFalse(replace(link.change, epoch=0).verify(PINS["alice"], link.signature))

    def test_genesis_members(self) -> None:
        """A genesis adds its creator first as admin, then the others by Cyphr ID."""
        first = genesis(CHAT, "alice", {"zed": MEMBER, "bob": ADMIN}, bytes(32), NOW)
        self.assertEqual(first.operations, (add("alice", ADMIN), add("bob", ADMIN), add("zed")))
        self.assertRaises(ValueError, genesis, CHAT, "alice", {"alice": ADMIN}, bytes(32), NOW)


class VectorTests(SynchronousTestCase):
    """tests/vectors/rosters-v1.json, rebuilt from its inputs alone."""

    def test_every_vector_rebuilds_byte_for_byte(self) -> None:
        """From the inputs alone: each change's content, signing input,
        signature and signed encoding; applied in turn, each state's
        encoding, hash and name AAD; each name key's commitment."""
        keys = {i["cyphrId"]: SigningKey(bytes.fromhex(i["ed25519Seed"]))
                for i in VECTORS["identities"]}
        for identity in VECTORS["identities"]:
            self.assertEqual(bytes(keys[identity["cyphrId"]].verify_key).hex(),
                             identity["ed25519PublicKey"])
        self.assertEqual(VECTORS["identities"][0]["ed25519Seed"], bytes(range(32)).hex())
        for name_key in VECTORS["nameKeys"]:
            self.assertEqual(name_key_commitment(name_key["chatId"], name_key["epoch"],
                                                 bytes.fromhex(name_key["key"])).hex(),
                             name_key["commitment"])
        kinds = {"add": rosters.ADD, "remove": rosters.REMOVE, "setRole": rosters.SET_ROLE}
        state = None
        for entry in VECTORS["changes"]:
            i = entry["inputs"]
            change = RosterChange(
                i["chatId"], i["epoch"], bytes.fromhex(i["previousHash"]), i["author"],
                tuple(rosters.Operation(kinds[op["op"]], op["cyphrId"], op["role"])
                      for op in i["operations"]),
                None if i["nameKeyCommitment"] is None else bytes.fromhex(i["nameKeyCommitment"]),
                i["createdAt"])
            content = change.content()
            self.assertEqual(content.hex(), entry["content"])
            self.assertEqual(signing.sign_content(signing.ROSTER, content).hex(),
                             entry["signContent"])
            signature = change.sign(keys[change.author])
            self.assertEqual(signature.hex(), entry["signature"])
            self.assertEqual(SignedChange(change, signature).encode().hex(),
                             entry["signedChange"])
            state = apply(state, change, signature,
                          lambda who: bytes(keys[who].verify_key) if who in keys else None)
            self.assertEqual(dict(state.members), entry["state"]["members"])
            self.assertEqual(state.name_key_epoch, entry["state"]["nameKeyEpoch"])
            self.assertEqual(state.encode().hex(), entry["state"]["encoding"])
            self.assertEqual(state.state_hash().hex(), entry["state"]["hash"])
            self.assertEqual(name_aad(state).hex(), entry["state"]["nameAad"])
        self.assertEqual(len(VECTORS["changes"]), 3)

    def test_the_file_is_what_the_code_makes(self) -> None:
        """tools/make_vectors.py would write exactly the shipped file."""
        import sys

        sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
        try:
            import make_vectors
        finally:
            sys.path.pop(0)
        self.assertEqual(make_vectors.build_rosters(), VECTORS)
