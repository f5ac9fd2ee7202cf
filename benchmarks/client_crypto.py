"""
The reference client's cryptography, timed: identity derivation from a
phrase, sealing for 1, 5 and 50 recipients, opening, and the vault's
Argon2id unlock. Prints figures; no server needed.

    python benchmarks/client_crypto.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cyphr.client import crypto  # noqa: E402
from cyphr.client.crypto import Identity, Recipient  # noqa: E402
from cyphr.client.profile import Profile  # noqa: E402


def timed(f: Callable[[], object], repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000, max(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    phrase = crypto.new_phrase()
    print(f"{'operation':52} {'median ms':>10} {'max ms':>10}")

    def row(name: str, f: Callable[[], object], repeat: int = args.repeat) -> None:
        median, worst = timed(f, repeat)
        print(f"{name:52} {median:10.2f} {worst:10.2f}")

    row("identity from a 24-word phrase", lambda: Identity.from_phrase(phrase))
    sender = Identity.from_phrase(phrase)
    readers = [Identity.from_phrase(crypto.new_phrase()) for _ in range(50)]
    text = os.urandom(1000)
    for count in (1, 5, 50):
        recipients = [Recipient("me", sender.public_key, sender.kyber_public_key, 0)] + [
            Recipient(f"r{i}", r.public_key, r.kyber_public_key, 0) for i, r in enumerate(readers[:count])]
        payload = crypto.seal(sender, "me", recipients, text, chat_id="c", message_type="text",
                              client_message_id="m")
        size = len(json.dumps(payload))
        row(f"seal 1 KB for {count} recipient(s) + sender ({size:,} B)",
            lambda recipients=recipients: crypto.seal(sender, "me", recipients, text, chat_id="c",
                                                      message_type="text", client_message_id="m"))
        envelope = {"chatId": "c", "senderId": "me", "messageType": "text", "clientMessageId": "m"}
        row(f"open it (one of {count + 1})",
            lambda payload=payload: crypto.open_sealed(payload, reader=readers[0], reader_id="r0",
                                                       sender_key=sender.public_key,
                                                       envelope=envelope))
    with tempfile.TemporaryDirectory() as directory:
        Profile.create(Path(directory) / "p", "correct horse battery staple 4711", {}, {"seed": "x"})
        row("unlock the vault (Argon2id, 3 passes, 64 MiB)",
            lambda: Profile.open(Path(directory) / "p", "correct horse battery staple 4711"), repeat=min(args.repeat, 5))


if __name__ == "__main__":
    main()
