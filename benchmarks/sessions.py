"""
The cost of sessions (cyphr.client.sessions) in the reference client's
Python: a handshake, a message on an open chain, a ratchet step, an ML-KEM
re-keying; the bytes each adds; and the time to send one message to a
group of 100 members on 3 devices each (300 sessions, each carrying the
message's 32-byte content key: issue #22's target is under 50 ms), the
same as a whole message over sessions (cyphr.client.sessionmessages) with
its JSON, the bytes each recipient device adds, and a reader's open.

    python benchmarks/sessions.py [--repeat 200]

Single-threaded, in this process; each figure is the median of --repeat
runs (the group send: of --repeat // 20 runs). No server is involved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

from cyphr.client import sessionmessages, sessions  # noqa: E402
from cyphr.client.sessions import Bundle, Me, Party, Policy, Prekey, PrekeySecrets  # noqa: E402

NOW = 1_790_000_000_000
DAY = 86_400_000


class Device:
    def __init__(self, owner: str, device_id: int) -> None:
        seed = os.urandom(64)
        self.signing_key = SigningKey(seed[:32])
        self.identity_key = bytes(self.signing_key.verify_key)
        private = sessions.identity_dh_private(seed)
        public = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
        self.me = Me(Party(owner, device_id, self.identity_key, public), private,
                     sessions.sign_identity_dh(self.signing_key, owner, public))
        self.spk = os.urandom(32)
        self.kem_seed = os.urandom(64)
        self.opk = os.urandom(32)

    def bundle(self) -> Bundle:
        party = self.me.party

        def prekey(kind: int, key_id: int, public: bytes) -> Prekey:
            return Prekey(kind, party.owner, party.device_id, key_id, NOW - DAY, NOW + DAY,
                          public).signed(self.signing_key)

        x = X25519PrivateKey.from_private_bytes
        kem = MLKEM1024PrivateKey.from_seed_bytes(self.kem_seed).public_key().public_bytes_raw()
        return Bundle(party.owner, party.device_id, party.identity_dh,
                      self.me.identity_dh_signature,
                      prekey(sessions.DH_SIGNED, 1, x(self.spk).public_key().public_bytes_raw()),
                      prekey(sessions.KEM_ONE_TIME, 2, kem),
                      prekey(sessions.DH_ONE_TIME, 3, x(self.opk).public_key().public_bytes_raw()))


def handshake(alice: Device, bob: Device, policy: Policy = Policy()
              ) -> tuple[sessions.Session, sessions.Session, bytes, bytes]:
    mine, hello = sessions.initiate(alice.me, bob.bundle(), bob.identity_key, NOW, policy=policy)
    first = mine.encrypt(b"hello", NOW)
    theirs = sessions.respond(bob.me, hello, alice.identity_key,
                              PrekeySecrets(bob.spk, bob.kem_seed, bob.opk), NOW, policy=policy)
    theirs.decrypt(first, NOW)
    return mine, theirs, hello.encode(), first


def median_ms(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    alice, bob = Device("alice", 1), Device("bob", 2)
    rows: list[tuple[str, str]] = []

    rows.append(("handshake (initiate, first message, respond, open)",
                 f"{median_ms(args.repeat, lambda: handshake(alice, bob)):.3f} ms"))

    mine, theirs, hello, first = handshake(alice, bob)
    payload = os.urandom(32)  # a content key
    rows.append(("message on an open chain (encrypt + decrypt, 32 B)",
                 f"{median_ms(args.repeat, lambda: theirs.decrypt(mine.encrypt(payload, NOW), NOW)):.3f} ms"))

    for what, policy in (("round trip with two X25519 ratchet steps",
                          Policy(rekey_messages=10**9, rekey_ms=10**15)),
                         ("round trip with two ratchet steps, each re-keyed with ML-KEM",
                          Policy(rekey_messages=1))):
        a, b, _, _ = handshake(alice, bob, policy)

        def round_trip() -> None:
            b.decrypt(a.encrypt(payload, NOW), NOW)
            a.decrypt(b.encrypt(payload, NOW), NOW)

        rows.append((what, f"{median_ms(args.repeat, round_trip):.3f} ms"))

    header, _, _ = sessions.decode_message(a.encrypt(payload, NOW))
    rows.append(("bytes: handshake", f"{len(hello)} B"))
    sealed = b"x" * 48  # 32 B and the Poly1305 tag
    for what, kem in (("plain header", ()), ("advertising an ML-KEM key", (b"k" * 1568,)),
                      ("re-keyed (and advertising)", (b"k" * 1568, b"c" * 1568, b"h" * 8))):
        message = sessions.encode_message(sessions.Header(header.dh, 0, 0, *kem), sealed)
        rows.append((f"bytes: message of 32 B, {what}", f"{len(message)} B"))

    # A group of 100 members on 3 devices each: 300 open sessions, each
    # carrying the message's content key on its current chain.
    group = [handshake(alice, Device(f"m{n}", 1 + n % 3))[0] for n in range(300)]

    def group_send() -> None:
        for session in group:
            session.encrypt(payload, NOW)

    rows.append(("send to 100 members x 3 devices (300 sessions, 32 B each)",
                 f"{median_ms(max(1, args.repeat // 20), group_send):.1f} ms"))

    # The whole message over sessions (cyphr.client.sessionmessages): the
    # body encrypted once, an envelope through each of the 300 sessions,
    # the send's JSON; and one reader opening it.
    pairs = [handshake(alice, Device(f"g{n}", 1 + n % 3)) for n in range(300)]
    recipients = [sessionmessages.Recipient(mine) for mine, _, _, _ in pairs]
    counter = iter(range(1, 10**9))
    # After one round trip each, as in a group that talks: each session
    # has taken the peer's ML-KEM key and stopped advertising its own.
    settled = [handshake(alice, Device(f"s{n}", 1 + n % 3)) for n in range(300)]
    for mine, theirs, _, _ in settled:
        mine.decrypt(theirs.encrypt(b"back", NOW), NOW)
        theirs.decrypt(mine.encrypt(b"again", NOW), NOW)
        mine.decrypt(theirs.encrypt(b"and back", NOW), NOW)
    settled_recipients = [sessionmessages.Recipient(mine) for mine, _, _, _ in settled]

    def header() -> sessionmessages.BodyHeader:
        return sessionmessages.BodyHeader("c0ffee00-0000-4000-8000-000000000000", "alice", 1,
                                          "text", "m", next(counter), NOW)

    text = b"a message of about a hundred bytes, as most are: " + b"x" * 50

    for what, group_recipients in (("new sessions", recipients),
                                   ("after a round trip each", settled_recipients)):
        def group_message() -> object:
            sealed = sessionmessages.seal(text, header(), group_recipients)
            return json.dumps({"encryptedPayload": sealed.payload, "envelopes": sealed.envelopes})

        rows.append((f"message over sessions to 300 devices ({what}; seal + JSON)",
                     f"{median_ms(max(1, args.repeat // 20), group_message):.1f} ms"))
        sealed = sessionmessages.seal(text, header(), group_recipients)
        sizes = [len(json.dumps(e, separators=(",", ":"))) for e in sealed.envelopes]
        rows.append((f"bytes per recipient device ({what}; its envelope's JSON)",
                     f"{statistics.median(sizes):.0f} B"))
    sealed = sessionmessages.seal(text, header(), recipients)
    rows.append(("bytes: the body of 100 B (JSON, padded to 256 B)",
                 f"{len(json.dumps(sealed.payload, separators=(',', ':')))} B"))
    theirs = pairs[0][1]
    mine_envelope = sealed.envelopes[[e["cyphrId"] for e in sealed.envelopes].index("g0")]

    def reader_opens() -> object:
        message = {"encryptedPayload": sealed.payload, "envelope": {
            "kind": mine_envelope["kind"], "envelope": mine_envelope["envelope"]},
            "senderId": "alice", "senderDeviceId": 1, "chatId": sealed.header.chat_id,
            "messageType": "text", "clientMessageId": "m"}
        trial = sessions.Session.load(theirs.export())
        return sessionmessages.open_message(message, trial, NOW)

    rows.append(("one reader opens it (session copy, checks, body)",
                 f"{median_ms(args.repeat, reader_opens):.3f} ms"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
