"""
Sessions between devices (cyphr.client.sessions, issue #22's first step):
bundles a server cannot forge, the PQXDH handshake, the Double Ratchet
with ML-KEM re-keying, and the bounds and refusals of each; forward
secrecy and post-compromise security shown with a stolen state, also for
an attacker who can compute every X25519 secret. Pure library: no server.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from kyber_py.ml_kem import ML_KEM_1024
from nacl.signing import SigningKey
from twisted.trial.unittest import SynchronousTestCase

from cyphr.client import crypto, sessions
from cyphr.client.sessions import (
    DH_ONE_TIME,
    DH_SIGNED,
    KEM_LAST_RESORT,
    KEM_ONE_TIME,
    Bundle,
    Handshake,
    Me,
    Party,
    Policy,
    Prekey,
    PrekeySecrets,
    Replayed,
    Session,
    SessionError,
    initiate,
    respond,
)

NOW = 1_790_000_000_000
DAY = 86_400_000


def x25519_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


class Device:
    """One device of an identity, with every prekey kind published once."""

    def __init__(self, owner: str, device_id: int, seed: bytes | None = None) -> None:
        seed = seed or os.urandom(64)
        self.signing_key = SigningKey(seed[:32])
        self.identity_key = bytes(self.signing_key.verify_key)
        dh_private = sessions.identity_dh_private(seed)
        dh_public = x25519_public(dh_private)
        self.me = Me(Party(owner, device_id, self.identity_key, dh_public), dh_private,
                     sessions.sign_identity_dh(self.signing_key, owner, dh_public))
        self.secrets: dict[tuple[int, int], bytes] = {}
        self.signed = self.prekey(DH_SIGNED, 1)
        self.last_resort = self.prekey(KEM_LAST_RESORT, 2)
        self.kem_one_time = self.prekey(KEM_ONE_TIME, 3)
        self.one_time = self.prekey(DH_ONE_TIME, 4)

    def prekey(self, kind: int, key_id: int, **changes: Any) -> Prekey:
        if kind in (DH_SIGNED, DH_ONE_TIME):
            private = os.urandom(32)
            public = x25519_public(private)
        else:
            private = os.urandom(64)
            public = MLKEM1024PrivateKey.from_seed_bytes(private).public_key().public_bytes_raw()
        self.secrets[(kind, key_id)] = private
        fields = dict(kind=kind, owner=self.me.party.owner, device_id=self.me.party.device_id,
                      key_id=key_id, created_at=NOW - DAY, expires_at=NOW + 30 * DAY,
                      public_key=public)
        fields.update(changes)
        return Prekey(**fields).signed(self.signing_key)

    def bundle(self, *, kem: Prekey | None = None, one_time: bool = True) -> Bundle:
        party = self.me.party
        return Bundle(party.owner, party.device_id, party.identity_dh, self.me.identity_dh_signature,
                      self.signed, kem or self.kem_one_time, self.one_time if one_time else None)

    def secrets_for(self, handshake: Handshake) -> PrekeySecrets:
        one_time = handshake.one_time_prekey_id
        return PrekeySecrets(
            self.secrets.get((DH_SIGNED, handshake.signed_prekey_id)),
            self.secrets.get((handshake.kem_kind, handshake.kem_prekey_id)),
            None if one_time is None else self.secrets.get((DH_ONE_TIME, one_time)))


def pair(policy: Policy | None = None, **bundle: Any) -> tuple[Session, Session, Device, Device]:
    """Alice's device 1 starts a session with bob's device 2; bob opens her
    first message. (alice's session, bob's session, alice, bob)."""
    alice, bob = Device("alice", 1), Device("bob", 2)
    mine, handshake = initiate(alice.me, bob.bundle(**bundle), bob.identity_key, NOW,
                               policy=policy)
    first = mine.encrypt(b"hello bob", NOW)
    received = Handshake.decode(handshake.encode())
    theirs = respond(bob.me, received, alice.identity_key, bob.secrets_for(received), NOW,
                     policy=policy)
    assert theirs.decrypt(first, NOW) == b"hello bob"
    return mine, theirs, alice, bob


class BundleTests(SynchronousTestCase):
    def test_a_good_bundle_passes(self) -> None:
        bob = Device("bob", 2)
        sessions.check_bundle(bob.bundle(), bob.identity_key, NOW)
        sessions.check_bundle(bob.bundle(kem=bob.last_resort, one_time=False), bob.identity_key,
                              NOW)

    def test_a_forged_part_is_refused(self) -> None:
        """Each part of a bundle signed by another key, bound to another
        device or owner, of another kind, expired, or of a wrong size is
        refused, saying which prekey and why; so is an X25519 identity key
        that the pinned identity key did not certify."""
        bob, mallory = Device("bob", 2), Device("bob", 2)
        good = bob.bundle()
        cases = [
            ("prekey 1 of bob's device 2 is not signed by bob's identity key",
             replace(good, signed_prekey=mallory.signed)),
            ("prekey 9 of bob's device 2 is bound to another device",
             replace(good, kem_prekey=bob.prekey(KEM_ONE_TIME, 9, device_id=3))),
            ("prekey 9 of bob's device 2 is bound to another device",
             replace(good, one_time_prekey=bob.prekey(DH_ONE_TIME, 9, owner="carol"))),
            ("prekey 4 of bob's device 2 is not of the kind expected here",
             replace(good, signed_prekey=bob.one_time)),
            ("prekey 9 of bob's device 2 is not valid now",
             replace(good, signed_prekey=bob.prekey(DH_SIGNED, 9, expires_at=NOW - 1))),
            ("bob's X25519 identity key is not signed by its identity key",
             replace(good, identity_dh=mallory.me.party.identity_dh)),
        ]
        for why, bundle in cases:
            with self.assertRaises(SessionError) as caught:
                sessions.check_bundle(bundle, bob.identity_key, NOW)
            self.assertIn(why, str(caught.exception))
        resized = replace(bob.one_time, public_key=bob.one_time.public_key + b"\0")
        with self.assertRaises(SessionError):
            sessions.check_bundle(replace(good, one_time_prekey=resized.signed(bob.signing_key)),
                                  bob.identity_key, NOW)

    def test_labels_do_not_cross(self) -> None:
        """A prekey's signature does not verify as any other kind: the kind
        byte and the label are both signed."""
        bob = Device("bob", 2)
        as_one_time = replace(bob.signed, kind=DH_ONE_TIME)
        with self.assertRaises(SessionError):
            as_one_time.check(bob.identity_key, "bob", 2, (DH_ONE_TIME,), NOW)


class HandshakeTests(SynchronousTestCase):
    def test_both_sides_agree_with_and_without_one_time_prekeys(self) -> None:
        for bundle in ({}, {"one_time": False}, {"kem": None, "one_time": False}):
            mine, theirs, _, _ = pair(**bundle)
            self.assertEqual(theirs.decrypt(mine.encrypt(b"again", NOW), NOW), b"again")
            self.assertEqual(mine.decrypt(theirs.encrypt(b"back", NOW), NOW), b"back")

    def test_the_handshake_encoding_round_trips(self) -> None:
        alice, bob = Device("alice", 1), Device("bob", 2)
        _, handshake = initiate(alice.me, bob.bundle(), bob.identity_key, NOW)
        self.assertEqual(Handshake.decode(handshake.encode()), handshake)
        for broken in (handshake.encode()[:-1], handshake.encode() + b"\0", b"\2" + b"\0" * 40):
            with self.assertRaises(SessionError):
                Handshake.decode(broken)

    def test_unknown_or_erased_prekeys_are_named(self) -> None:
        """A handshake naming a signed, ML-KEM or one-time prekey the device
        does not have (never had, or erased after a first use) is refused
        with the prekey's id."""
        alice, bob = Device("alice", 1), Device("bob", 2)
        _, handshake = initiate(alice.me, bob.bundle(), bob.identity_key, NOW)
        secrets = bob.secrets_for(handshake)
        for erased, name in ((replace(secrets, signed_prekey=None), "signed prekey 1"),
                             (replace(secrets, kem_prekey_seed=None), "ML-KEM prekey 3"),
                             (replace(secrets, one_time_prekey=None), "one-time prekey 4")):
            with self.assertRaises(SessionError) as caught:
                respond(bob.me, handshake, alice.identity_key, erased, NOW)
            self.assertIn(name, str(caught.exception))

    def test_an_identity_not_pinned_or_not_certified(self) -> None:
        alice, bob, mallory = Device("alice", 1), Device("bob", 2), Device("alice", 1)
        _, handshake = initiate(alice.me, bob.bundle(), bob.identity_key, NOW)
        with self.assertRaises(SessionError):
            respond(bob.me, handshake, mallory.identity_key, bob.secrets_for(handshake), NOW)
        forged = replace(handshake, sender=replace(handshake.sender,
                                                   identity_dh=mallory.me.party.identity_dh))
        with self.assertRaises(SessionError):
            respond(bob.me, forged, alice.identity_key, bob.secrets_for(handshake), NOW)

    def test_another_device_cannot_open(self) -> None:
        """The associated data names both devices: bob's device 3, with the
        same prekeys' secrets, does not open alice's first message."""
        alice, bob = Device("alice", 1), Device("bob", 2)
        mine, handshake = initiate(alice.me, bob.bundle(), bob.identity_key, NOW)
        first = mine.encrypt(b"for device 2", NOW)
        other = Me(replace(bob.me.party, device_id=3), bob.me.identity_dh_private,
                   bob.me.identity_dh_signature)
        theirs = respond(other, handshake, alice.identity_key, bob.secrets_for(handshake), NOW)
        with self.assertRaises(SessionError):
            theirs.decrypt(first, NOW)


class RatchetTests(SynchronousTestCase):
    def test_a_long_conversation_out_of_order(self) -> None:
        """1,000 messages both ways in bursts, each burst delivered shuffled,
        some held back and delivered a burst later: every one opens once,
        and the skipped keys are all used up."""
        mine, theirs, _, _ = pair()
        shuffle = random.Random(7)
        held: list[tuple[Session, bytes, bytes]] = []
        sent = 0
        while sent < 1000:
            sender, receiver = (mine, theirs) if (sent // 10) % 2 == 0 else (theirs, mine)
            burst = []
            for _ in range(shuffle.randint(1, 10)):
                text = f"message {sent}".encode()
                burst.append((receiver, sender.encrypt(text, NOW), text))
                sent += 1
            shuffle.shuffle(burst)
            later = [b for b in burst if shuffle.random() < 0.2]
            for item in held + [b for b in burst if b not in later]:
                receiver_, message, text = item
                self.assertEqual(receiver_.decrypt(message, NOW), text)
            held = later
        for receiver, message, text in held:
            self.assertEqual(receiver.decrypt(message, NOW), text)
        self.assertEqual((mine.skipped_keys, theirs.skipped_keys), (0, 0))

    def test_a_replay_is_refused_and_changes_nothing(self) -> None:
        mine, theirs, _, _ = pair()
        message = mine.encrypt(b"once", NOW)
        self.assertEqual(theirs.decrypt(message, NOW), b"once")
        with self.assertRaises(Replayed):
            theirs.decrypt(message, NOW)
        # And from an earlier chain, after the ratchet moved on.
        mine.decrypt(theirs.encrypt(b"turn", NOW), NOW)
        self.assertEqual(theirs.decrypt(mine.encrypt(b"next", NOW), NOW), b"next")
        with self.assertRaises(Replayed):
            theirs.decrypt(message, NOW)
        self.assertEqual(theirs.decrypt(mine.encrypt(b"still fine", NOW), NOW), b"still fine")

    def test_a_gap_past_the_bound_is_refused(self) -> None:
        mine, theirs, _, _ = pair(policy=Policy(max_skip=5))
        for _ in range(6):
            mine.encrypt(b"lost", NOW)
        with self.assertRaises(SessionError) as caught:
            theirs.decrypt(mine.encrypt(b"too far", NOW), NOW)
        self.assertIn("at most 5 may be skipped", str(caught.exception))

    def test_skipped_keys_are_bounded_in_number_and_age(self) -> None:
        mine, theirs, _, _ = pair(policy=Policy(max_skipped_keys=3, skipped_key_ttl_ms=DAY))
        early = [mine.encrypt(f"skipped {n}".encode(), NOW) for n in range(5)]
        theirs.decrypt(mine.encrypt(b"last", NOW), NOW)
        self.assertEqual(theirs.skipped_keys, 3)  # the oldest two dropped
        with self.assertRaises(Replayed):
            theirs.decrypt(early[0], NOW)
        self.assertEqual(theirs.decrypt(early[3], NOW), b"skipped 3")
        with self.assertRaises(SessionError):
            theirs.decrypt(early[4], NOW + 2 * DAY)  # expired
        self.assertEqual(theirs.skipped_keys, 2)  # 2 and 4: the failed try changed nothing

    def test_an_altered_message_changes_nothing(self) -> None:
        mine, theirs, _, _ = pair()
        message = bytearray(mine.encrypt(b"intact", NOW))
        message[-1] ^= 1
        with self.assertRaises(SessionError):
            theirs.decrypt(bytes(message), NOW)
        message[-1] ^= 1
        self.assertEqual(theirs.decrypt(bytes(message), NOW), b"intact")

    def test_export_and_load(self) -> None:
        mine, theirs, _, _ = pair()
        mine.encrypt(b"skipped", NOW)
        theirs.decrypt(mine.encrypt(b"after", NOW), NOW)
        loaded = Session.load(theirs.export())
        self.assertEqual(loaded.export(), theirs.export())
        self.assertEqual(loaded.decrypt(mine.encrypt(b"more", NOW), NOW), b"more")


class KemRekeyTests(SynchronousTestCase):
    def test_rekeying_happens_and_both_keep_talking(self) -> None:
        """With a re-keying every 3 messages sent, headers carry ML-KEM
        ciphertexts on schedule, each to the peer's latest key, and the
        conversation goes on."""
        mine, theirs, _, _ = pair(policy=Policy(rekey_messages=3))
        rekeyed = 0
        for turn in range(20):
            sender, receiver = (mine, theirs) if turn % 2 == 0 else (theirs, mine)
            for n in range(2):
                message = sender.encrypt(f"{turn}.{n}".encode(), NOW)
                header, _, _ = sessions.decode_message(message)
                rekeyed += n == 0 and bool(header.kem_ciphertext)
                self.assertEqual(receiver.decrypt(message, NOW), f"{turn}.{n}".encode())
        self.assertGreaterEqual(rekeyed, 8)

    def test_rekeying_by_time(self) -> None:
        mine, theirs, _, _ = pair(policy=Policy(rekey_ms=DAY))
        theirs_message = theirs.encrypt(b"soon", NOW)
        header, _, _ = sessions.decode_message(theirs_message)
        self.assertEqual(header.kem_ciphertext, b"")
        mine.decrypt(theirs_message, NOW + 2 * DAY)
        header, _, _ = sessions.decode_message(mine.encrypt(b"a day later", NOW + 2 * DAY))
        self.assertEqual(len(header.kem_ciphertext), sessions.MLKEM_CIPHERTEXT_BYTES)


class StolenStateTests(SynchronousTestCase):
    """What an attacker gets with a copy of bob's state taken at time T."""

    def converse(self, a: Session, b: Session, turns: int, tag: str) -> list[bytes]:
        """``turns`` round trips; the messages as they went over the wire."""
        wire = []
        for turn in range(turns):
            for sender, receiver in ((a, b), (b, a)):
                message = sender.encrypt(f"{tag} {turn}".encode(), NOW)
                wire.append(message)
                receiver.decrypt(message, NOW)
        return wire

    def test_forward_secrecy(self) -> None:
        """A copy of bob's state opens none of the messages sent before it
        was taken, whichever way they went."""
        mine, theirs, _, _ = pair()
        before = self.converse(mine, theirs, 5, "before")
        stolen = Session.load(theirs.export())
        for message in before:
            with self.assertRaises(SessionError):
                stolen.decrypt(message, NOW)

    def test_healing_after_a_round_trip(self) -> None:
        """A passive attacker with bob's state at T follows the session as
        far as bob's keys of T take it: it opens alice's next message. Bob's
        answer comes from a ratchet key made after T, and alice's reply to
        it is closed to the attacker."""
        mine, theirs, _, _ = pair()
        self.converse(mine, theirs, 2, "before")
        attacker = Session.load(theirs.export())
        same_epoch = mine.encrypt(b"same epoch", NOW)
        theirs.decrypt(same_epoch, NOW)
        self.assertEqual(attacker.decrypt(same_epoch, NOW), b"same epoch")
        mine.decrypt(theirs.encrypt(b"answer", NOW), NOW)
        healed = mine.encrypt(b"healed", NOW)
        self.assertEqual(theirs.decrypt(healed, NOW), b"healed")
        with self.assertRaises(SessionError):
            attacker.decrypt(healed, NOW)

    def quantum_attacker(self, policy: Policy) -> list[bytes]:
        """What alice sends bob after T that opens for an attacker holding
        bob's state of T and, as a quantum computer would compute them from
        the public keys on the wire, the X25519 private keys bob's ratchet
        steps make after T (not the ML-KEM keys he makes: it draws its own).
        Stops at the first message that does not open."""
        seen: list[bytes] = []

        def spying_random(n: int) -> bytes:
            value = os.urandom(n)
            if n == 32:
                seen.append(value)  # every X25519 ratchet private key
            return value

        alice, bob = Device("alice", 1), Device("bob", 2)
        mine, handshake = initiate(alice.me, bob.bundle(), bob.identity_key, NOW, policy=policy,
                                   random=spying_random)
        first = mine.encrypt(b"hello", NOW)
        theirs = respond(bob.me, handshake, alice.identity_key, bob.secrets_for(handshake), NOW,
                         policy=policy, random=spying_random)
        theirs.decrypt(first, NOW)
        self.converse(mine, theirs, 2, "before")
        stolen = theirs.export()
        mark = len(seen)
        after = self.converse(mine, theirs, 3, "after")
        # Each turn, bob's ratchet step draws first, then alice's: bob's
        # new X25519 keys are every other one.
        bobs = iter(seen[mark:][0::2])
        attacker = Session.load(stolen, policy=policy,
                                random=lambda n: next(bobs) if n == 32 else os.urandom(n))
        opened = []
        for message in after[::2]:  # what alice sent to bob
            try:
                opened.append(attacker.decrypt(message, NOW))
            except SessionError:
                break
        return opened

    def test_healing_against_a_quantum_attacker(self) -> None:
        """The attacker holds bob's state at T and can also compute every
        X25519 secret. Alice's first message after T is re-keyed to bob's
        ML-KEM key of T, which the attacker holds: it opens. Bob's answer
        is re-keyed to alice's ML-KEM key, which the attacker lacks: from
        then on it cannot derive the root key, and nothing alice sends opens."""
        self.assertEqual(self.quantum_attacker(Policy(rekey_messages=1)), [b"after 0"])

    def test_the_attacker_without_rekeying_would_read_on(self) -> None:
        """The control of the test above: with no re-keying (and the same
        X25519 secrets handed over), the attacker does follow the session
        and opens everything alice sends after T."""
        self.assertEqual(self.quantum_attacker(Policy(rekey_messages=10**9)),
                         [b"after 0", b"after 1", b"after 2"])

VECTORS = json.loads((Path(__file__).parent / "vectors" / "sessions-v1.json").read_text("utf-8"))


class ReplayedVectors(SynchronousTestCase):
    """A session vector file (``vectors``) replayed: its time, its two
    identities, and its listed randomness and encapsulation messages
    (kyber-py's ML-KEM.Encaps_internal), handed out in order."""

    vectors: dict[str, Any]

    def setUp(self) -> None:
        v = self.vectors
        self.now = v["inputs"]["now"]
        self.draws = iter(bytes.fromhex(d["bytes"]) for d in v["randomDraws"])
        self.ms = iter(bytes.fromhex(e["m"]) for e in v["encapsulations"])
        self.identities = {name: crypto.Identity(bytes.fromhex(v["inputs"][seed]))
                           for name, seed in (("alice_01", "aliceSeed"), ("bob_02", "bobSeed"))}

    def random(self, n: int) -> bytes:
        value = next(self.draws)
        assert len(value) == n, (len(value), n)
        return value

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        return ML_KEM_1024._encaps_internal(public_key, next(self.ms))


class VectorTests(ReplayedVectors):
    """tests/vectors/sessions-v1.json, rebuilt from its inputs alone with
    its listed randomness and encapsulation messages; OpenSSL decapsulates
    when each receiver opens."""

    vectors = VECTORS

    def setUp(self) -> None:
        super().setUp()
        self.me = {}
        for (name, identity), device in zip(self.identities.items(), (1, 2)):
            private = sessions.identity_dh_private(identity.seed)
            public = x25519_public(private)
            self.me[name] = Me(Party(name, device, identity.public_key, public), private,
                               sessions.sign_identity_dh(identity.signing_key, name, public))

    def test_the_session_rebuilds_byte_for_byte(self) -> None:
        v, inputs = VECTORS, VECTORS["inputs"]
        bob = self.identities["bob_02"]
        self.assertEqual(self.me["alice_01"].party.identity_dh.hex(), v["aliceIdentityDh"])
        self.assertEqual(self.me["bob_02"].party.identity_dh.hex(), v["bobIdentityDh"])
        self.assertEqual(self.me["bob_02"].identity_dh_signature.hex(),
                         v["bundle"]["identityDhSignature"])
        prekeys = [Prekey(p["kind"], "bob_02", 2, p["keyId"], p["createdAt"], p["expiresAt"],
                          bytes.fromhex(p["publicKey"])).signed(bob.signing_key)
                   for p in v["bundle"]["prekeys"]]
        self.assertEqual([p.signature.hex() for p in prekeys],
                         [p["signature"] for p in v["bundle"]["prekeys"]])
        privates = [bytes.fromhex(inputs[k]) for k in (
            "bobSignedPrekeyPrivate", "bobLastResortKemSeed", "bobOneTimePrekeyPrivate")]
        self.assertEqual(prekeys[0].public_key, x25519_public(privates[0]))
        self.assertEqual(prekeys[1].public_key, MLKEM1024PrivateKey.from_seed_bytes(
            privates[1]).public_key().public_bytes_raw())
        self.assertEqual(prekeys[2].public_key, x25519_public(privates[2]))
        bundle = Bundle("bob_02", 2, self.me["bob_02"].party.identity_dh,
                        self.me["bob_02"].identity_dh_signature, *prekeys)
        policy = Policy(rekey_messages=inputs["rekeyMessages"])
        mine, handshake = initiate(self.me["alice_01"], bundle, bob.public_key, self.now,
                                   ephemeral=bytes.fromhex(inputs["aliceEphemeralPrivate"]),
                                   encapsulate_with=self.encapsulate, random=self.random,
                                   policy=policy)
        self.assertEqual(handshake.encode().hex(), v["handshake"])
        self.assertEqual(mine.ad.hex(), v["associatedData"])
        kem_secret = bytes.fromhex(v["encapsulations"][0]["sharedSecret"])
        self.assertEqual(sessions._shared_key([bytes.fromhex(d) for d in v["dhOutputs"]],
                                              kem_secret).hex(), v["sharedKey"])
        sessions_by_name = {"alice_01": mine}
        first = v["messages"][0]
        self.assertEqual(mine.encrypt(bytes.fromhex(first["plaintext"]), self.now).hex(),
                         first["message"])
        theirs = respond(self.me["bob_02"], Handshake.decode(bytes.fromhex(v["handshake"])),
                         self.identities["alice_01"].public_key,
                         PrekeySecrets(privates[0], privates[1], privates[2]), self.now,
                         encapsulate_with=self.encapsulate, random=self.random, policy=policy)
        sessions_by_name["bob_02"] = theirs
        self.assertEqual(theirs.decrypt(bytes.fromhex(first["message"]), self.now),
                         bytes.fromhex(first["plaintext"]))
        for message in v["messages"][1:]:
            sender = sessions_by_name[message["from"]]
            receiver = theirs if sender is mine else mine
            made = sender.encrypt(bytes.fromhex(message["plaintext"]), self.now)
            self.assertEqual(made.hex(), message["message"])
            self.assertEqual(receiver.decrypt(made, self.now), bytes.fromhex(message["plaintext"]))
        self.assertEqual(next(self.draws, None), None)
        # The handshake's, then a re-keying on each new sending chain of a
        # side that sent since its last (alice's last one after bob's reply).
        self.assertEqual(len(v["encapsulations"]), 4)

    def test_the_vector_opens_with_the_library_alone(self) -> None:
        """Bob's side with OpenSSL only (no kyber-py): the handshake and
        alice's messages open from bob's prekeys' secrets."""
        v, inputs = VECTORS, VECTORS["inputs"]
        handshake = Handshake.decode(bytes.fromhex(v["handshake"]))
        secrets = PrekeySecrets(*(bytes.fromhex(inputs[k]) for k in (
            "bobSignedPrekeyPrivate", "bobLastResortKemSeed", "bobOneTimePrekeyPrivate")))
        theirs = respond(self.me["bob_02"], handshake, self.identities["alice_01"].public_key,
                         secrets, self.now)
        first = v["messages"][0]
        self.assertEqual(theirs.decrypt(bytes.fromhex(first["message"]), self.now),
                         bytes.fromhex(first["plaintext"]))
