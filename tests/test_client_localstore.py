"""
The client's local store (cyphr.client.localstore): values and history
round-trip, are sealed under the profile's key with nothing readable in any
file, refuse a value moved to another row, and survive several threads and
processes changing them at once.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from cyphr.client.localstore import STORE_FILE, LocalStore, LocalStoreError
from cyphr.client.profile import Profile

ROOT = Path(__file__).resolve().parent.parent
STRONG = "seventeen purple lanterns juggle over quiet harbours"
CHAT = "7c0d3f52-9a41-4e8b-b0a6-2f5e8d1c4a93"
OTHER_CHAT = "e1b2c3d4-0000-4aaa-8bbb-123456789abc"


def new_profile(case: SynchronousTestCase) -> Profile:
    """A new profile in a directory of its own (one Argon2 derivation)."""
    # Absolute: the processes of a test run elsewhere.
    profile = Profile.create(Path(case.mktemp()).absolute(), STRONG,
                             {"server": "http://localhost"}, {})
    case.addCleanup(profile.close)
    return profile


def open_store(case: SynchronousTestCase, profile: Profile) -> LocalStore:
    store = LocalStore.open(profile)
    case.addCleanup(store.close)
    return store


def message(message_id: str, seq: int, chat_id: str = CHAT, **rest: object) -> dict:
    return {"id": message_id, "chatId": chat_id, "seq": seq, **rest}


class RoundTripTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.profile = new_profile(self)
        self.store = open_store(self, self.profile)

    def test_values(self) -> None:
        """A value put is got back as it was, a new put replaces it, a
        delete removes it, items() answers a namespace's keys and values
        and no other's; all of it is there again once the profile is
        opened anew with its passphrase."""
        value = {"root": "q83v", "chains": [1, 2.5, None, True], "name": "Zoë ✓"}
        self.store.put("sessions", "bob", value)
        self.store.put("sessions", "carol", "first")
        self.store.put("sessions", "carol", ["second"])
        self.store.put("sessions", "dave", 4)
        self.store.put("contacts", "bob", {"pinned": True})
        self.store.delete("sessions", "dave")
        self.store.delete("sessions", "nobody")
        self.assertEqual(self.store.get("sessions", "bob"), value)
        self.assertIsNone(self.store.get("sessions", "dave"))
        self.assertIsNone(self.store.get("nowhere", "bob"))
        self.assertEqual(self.store.items("sessions"), {"bob": value, "carol": ["second"]})
        self.assertEqual(self.store.items("contacts"), {"bob": {"pinned": True}})
        self.assertEqual(self.store.items("nowhere"), {})
        self.store.close()
        with self.assertRaises(LocalStoreError):
            self.store.get("sessions", "bob")
        again = open_store(self, Profile.open(self.profile.directory, STRONG))
        self.assertEqual(again.items("sessions"), {"bob": value, "carol": ["second"]})

    def test_messages(self) -> None:
        """A message kept is answered by id with everything it had;
        update_message merges changes (its seq too) and answers the new
        record; an unknown id answers None; a record without an id, chat
        id or integer seq, or a change of id, is refused."""
        record = message("m-1", 5, sender="bob", device=2, text="hi", sentAt=1700000000123)
        self.assertTrue(self.store.add_message(record))
        self.assertEqual(self.store.message("m-1"), record)
        self.assertIsNone(self.store.message("m-2"))
        updated = self.store.update_message("m-1", {"receipts": {"read": ["alice"]}, "seq": 9})
        self.assertEqual(updated, dict(record, receipts={"read": ["alice"]}, seq=9))
        self.assertEqual(self.store.message("m-1"), updated)
        self.assertEqual([m["seq"] for m in self.store.messages(CHAT)], [9])
        self.assertIsNone(self.store.update_message("m-2", {"deleted": True}))
        self.assertRaises(ValueError, self.store.update_message, "m-1", {"id": "m-3"})
        self.assertRaises(ValueError, self.store.add_message, {"id": "m-4", "chatId": CHAT})
        self.assertRaises(ValueError, self.store.add_message, message("m-4", True))
        self.assertRaises(ValueError, self.store.add_message, {"chatId": CHAT, "seq": 1})

    def test_add_message_idempotent(self) -> None:
        """A message added again (the same id, whatever it holds) answers
        False and leaves the first one, once."""
        self.assertTrue(self.store.add_message(message("m-1", 1, text="first")))
        self.assertFalse(self.store.add_message(message("m-1", 2, text="second")))
        self.assertEqual(self.store.messages(CHAT), [message("m-1", 1, text="first")])

    def test_ordering_and_paging(self) -> None:
        """messages() answers a chat's messages, no other's, in ascending
        seq whatever the order they came in: the latest ``limit``, the
        latest before ``before_seq``, the first after ``after_seq``."""
        seqs = list(range(1, 11))
        random.Random(7).shuffle(seqs)
        for seq in seqs:
            self.store.add_message(message(f"a-{seq}", seq))
            self.store.add_message(message(f"b-{seq}", seq, OTHER_CHAT))

        def page(**kwargs: int) -> list[int]:
            found = self.store.messages(CHAT, **kwargs)
            self.assertEqual({m["chatId"] for m in found} - {CHAT}, set())
            return [m["seq"] for m in found]

        self.assertEqual(page(), list(range(1, 11)))
        self.assertEqual(page(limit=3), [8, 9, 10])
        self.assertEqual(page(limit=3, before_seq=8), [5, 6, 7])
        self.assertEqual(page(limit=3, before_seq=2), [1])
        self.assertEqual(page(limit=3, after_seq=2), [3, 4, 5])
        self.assertEqual(page(limit=3, after_seq=9), [10])
        self.assertEqual(page(after_seq=2, before_seq=6), [3, 4, 5])
        self.assertEqual(self.store.messages("no such chat"), [])

    def test_transactions(self) -> None:
        """A transaction's changes are all kept when it ends and none when
        it raises; a nested one that raises undoes only its own."""
        with self.store.transaction() as txn:
            txn.put("n", "outer", 1)
            try:
                with txn.transaction():
                    txn.put("n", "inner", 1)
                    txn.add_message(message("m-1", 1))
                    raise ZeroDivisionError()
            except ZeroDivisionError:
                pass
            txn.put("n", "after", 1)
        self.assertEqual(self.store.items("n"), {"outer": 1, "after": 1})
        self.assertIsNone(self.store.message("m-1"))
        with self.assertRaises(KeyError):
            with self.store.transaction() as txn:
                txn.put("n", "outer", 2)
                txn.add_message(message("m-2", 2))
                raise KeyError()
        self.assertEqual(self.store.get("n", "outer"), 1)
        self.assertIsNone(self.store.message("m-2"))


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection to the store's file, as an attacker's."""
    return sqlite3.connect(path, isolation_level=None)


class SealingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.profile = new_profile(self)
        self.store = open_store(self, self.profile)
        self.path = self.profile.directory / STORE_FILE

    def test_file_modes(self) -> None:
        """The store and its WAL files are mode 0600 in the 0700 directory."""
        self.store.put("n", "k", 1)
        self.assertEqual(stat.S_IMODE(os.stat(self.profile.directory).st_mode), 0o700)
        for name in (STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm"):
            self.assertEqual(stat.S_IMODE(os.stat(self.profile.directory / name).st_mode), 0o600,
                             name)

    def test_wrong_key(self) -> None:
        """A store opened with another profile's key (its file copied
        there) is refused, saying that the key differs."""
        self.store.put("sessions", "bob", {"root": "secret"})
        self.store.close()
        other = new_profile(self)
        shutil.copy(self.path, other.directory / STORE_FILE)
        error = self.assertRaises(LocalStoreError, LocalStore.open, other)
        self.assertIn("sealed under another key", str(error))

    def test_moved_values_refused(self) -> None:
        """A value swapped with another row's, moved to another namespace,
        or a message whose chat or seq was changed in the file, does not
        open: it is refused, not answered."""
        self.store.put("sessions", "bob", "bob's state")
        self.store.put("sessions", "carol", "carol's state")
        self.store.put("other", "x", "x")
        self.store.add_message(message("m-1", 1, text="one"))
        self.store.add_message(message("m-2", 2, text="two"))
        self.store.add_message(message("m-3", 3, OTHER_CHAT, text="three"))
        db = raw(self.path)
        self.addCleanup(db.close)
        # The two rows of "sessions": the only namespace with two.
        [(first, first_box), (second, second_box)] = db.execute(
            "SELECT ref, box FROM kv WHERE ns = (SELECT ns FROM kv GROUP BY ns"
            " HAVING count(*) = 2)").fetchall()
        db.execute("UPDATE kv SET box = ? WHERE ref = ?", (second_box, first))
        db.execute("UPDATE kv SET box = ? WHERE ref = ?", (first_box, second))
        self.assertRaises(LocalStoreError, self.store.get, "sessions", "bob")
        self.assertRaises(LocalStoreError, self.store.get, "sessions", "carol")
        self.assertRaises(LocalStoreError, self.store.items, "sessions")
        # The "other" namespace's value, moved into "sessions"'s namespace.
        db.execute("UPDATE kv SET ns = (SELECT ns FROM kv WHERE ref = ?)"
                   " WHERE ref NOT IN (?, ?)", (first, first, second))
        self.assertEqual(self.store.items("other"), {})
        self.assertRaises(LocalStoreError, self.store.items, "sessions")
        # Swapped boxes, a changed seq, a message moved to another chat.
        [(one,), (two,)] = db.execute("SELECT box FROM messages WHERE seq < 3 ORDER BY seq")
        db.execute("UPDATE messages SET box = CASE seq WHEN 1 THEN ? ELSE ? END WHERE seq < 3",
                   (two, one))
        self.assertRaises(LocalStoreError, self.store.message, "m-1")
        self.assertRaises(LocalStoreError, self.store.messages, CHAT)
        db.execute("UPDATE messages SET seq = 4 WHERE seq = 3")
        self.assertRaises(LocalStoreError, self.store.message, "m-3")
        db.execute("UPDATE messages SET seq = 3 WHERE seq = 4")
        self.assertEqual(self.store.message("m-3")["text"], "three")
        db.execute("UPDATE messages SET chat = (SELECT chat FROM messages WHERE seq = 1)"
                   " WHERE seq = 3")
        self.assertRaises(LocalStoreError, self.store.message, "m-3")

    def test_nothing_in_clear(self) -> None:
        """No identifier, text, key name, namespace or key used is in any
        file of the profile directory, neither while the changes are in the
        WAL nor once they are checkpointed into the database and the store
        is closed."""
        secret_key = bytes(range(32))
        secrets = ["alice-the-sender", "bob-the-recipient", CHAT, OTHER_CHAT,
                   "msg-4f1c9e", "msg-77ab20", "the eagle lands at midnight",
                   "parcel under the third bench", "ratchet-sessions", "bob-the-recipient/7",
                   "pinned-identities", "favourite-colour", "ultramarine",
                   base64.b64encode(secret_key).decode(), secret_key.hex()]
        with self.store.transaction() as txn:
            txn.put("ratchet-sessions", "bob-the-recipient/7",
                    {"rootKey": base64.b64encode(secret_key).decode(), "hex": secret_key.hex()})
            txn.put("pinned-identities", "favourite-colour", "ultramarine")
            txn.add_message(message("msg-4f1c9e", 1, sender="alice-the-sender",
                                    text="the eagle lands at midnight"))
        self.store.add_message(message("msg-77ab20", 2, OTHER_CHAT, sender="bob-the-recipient",
                                       text="parcel under the third bench"))
        self.store.update_message("msg-77ab20", {"readBy": ["alice-the-sender"]})
        needles = [s.encode("utf-8") for s in secrets] + [
            secret_key, self.profile.subkey(b"cyphr-client local-store v1")]

        def check(when: str) -> dict[str, bytes]:
            files = {p.name: p.read_bytes() for p in self.profile.directory.iterdir()
                     if p.is_file()}
            for name, content in files.items():
                for needle in needles:
                    self.assertNotIn(needle, content, f"{needle!r} in {name} {when}")
            return files

        files = check("before a checkpoint")
        # The WAL holds the changes (the schema among them, in clear: the
        # search does see what is there).
        self.assertIn(b"CREATE TABLE", files[f"{STORE_FILE}-wal"])
        db = raw(self.path)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        files = check("after a checkpoint")
        self.assertIn(b"CREATE TABLE", files[STORE_FILE])
        self.store.close()
        check("once closed")


# One process of the concurrency test: opens the profile (passphrase on
# stdin), says "ready", waits for "go", then counts.
WORKER = """
import sys
from cyphr.client.localstore import LocalStore
from cyphr.client.profile import Profile
directory, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
profile = Profile.open(directory, sys.stdin.readline().rstrip("\\n"))
store = LocalStore.open(profile)
print("ready", flush=True)
sys.stdin.readline()
for n in range(count):
    with store.transaction() as txn:
        txn.put("counters", "shared", (txn.get("counters", "shared") or 0) + 1)
        txn.add_message({"id": f"{name}-{n}", "chatId": "counted", "seq": n, "by": name})
store.close()
profile.close()
print("done", flush=True)
"""


class ConcurrencyTests(SynchronousTestCase):
    def test_two_processes(self) -> None:
        """Two processes on one profile each increment a counter in the
        store 200 times, a transaction each (with a message added in it),
        all at once: the counter ends at exactly 400 and all 400 messages
        are kept."""
        profile = new_profile(self)
        open_store(self, profile).put("counters", "shared", 0)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(profile.directory),
                                     name, "200"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    cwd=str(ROOT), env=env) for name in ("listen", "send")]
        for worker in workers:
            self.addCleanup(lambda w=worker: w.poll() is None and w.kill())
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write(f"{STRONG}\n")
            worker.stdin.flush()
        for worker in workers:
            assert worker.stdout is not None and worker.stderr is not None
            if worker.stdout.readline() != "ready\n":
                self.fail(worker.stderr.read())
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        for worker in workers:
            out, err = worker.communicate(timeout=180)
            self.assertEqual((worker.returncode, out), (0, "done\n"), err)
        store = open_store(self, profile)
        self.assertEqual(store.get("counters", "shared"), 400)
        kept = store.messages("counted", limit=1000)
        self.assertEqual(sorted(m["id"] for m in kept),
                         sorted(f"{name}-{n}" for name in ("listen", "send") for n in range(200)))
        self.assertEqual([m["seq"] for m in kept], sorted(m["seq"] for m in kept))

    def test_threads(self) -> None:
        """Four threads, two on each of two stores of one profile (a store
        shared, and two connections), increment one counter 100 times
        each, a transaction each: it ends at exactly 400."""
        profile = new_profile(self)
        stores = [open_store(self, profile), open_store(self, profile)]
        failures: list[BaseException] = []

        def count(store: LocalStore, index: int) -> None:
            try:
                for n in range(100):
                    with store.transaction() as txn:
                        txn.put("counters", "shared", (txn.get("counters", "shared") or 0) + 1)
                        txn.add_message(message(f"{index}-{n}", n))
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)

        threads = [threading.Thread(target=count, args=(stores[i % 2], i)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(failures, [])
        self.assertEqual(stores[0].get("counters", "shared"), 400)
        self.assertEqual(len(stores[1].messages(CHAT, limit=1000)), 400)
