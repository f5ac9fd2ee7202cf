"""
One profile used by several processes at once (``listen`` in one
terminal, ``send`` and ``keys prekeys`` in others): every change is a
read-modify-write under an inter-process lock, so nothing one process
writes is lost by another, and every message is shown once and opens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from cyphr.client.client import Client
from cyphr.client.profile import LOCK_FILE, Profile
from tests.helpers import (CLIENT, SQLiteMixin, cli_in_process, finish, start_server,
                           wait_for_sockets)

ROOT = Path(__file__).resolve().parent.parent
STRONG = "correct horse battery staple 4711"


class MergeTests(SynchronousTestCase):
    def test_changes_of_two_openers_both_kept(self) -> None:
        """Two openers of one profile (as two processes are) each add an
        entry under the lock and save: both entries are in the vault, and
        each opener sees the other's."""
        directory = Path(self.mktemp())
        Profile.create(directory, STRONG, {"server": "http://localhost"}, {"prekeys": {}})
        first, second = Profile.open(directory, STRONG), Profile.open(directory, STRONG)
        with first.lock:
            first.vault["prekeys"]["1"] = "a"
            first.save()
        with second.lock:
            second.vault["prekeys"]["2"] = "b"
            second.save()
        with first.lock:
            self.assertEqual(first.vault["prekeys"], {"1": "a", "2": "b"})
        self.assertEqual(Profile.open(directory, STRONG).vault["prekeys"], {"1": "a", "2": "b"})

    def test_concurrent_writers_lose_nothing(self) -> None:
        """Eight openers in eight threads each add 25 entries, one save
        each: none fails (no shared temporary file) and all 200 are kept."""
        directory = Path(self.mktemp())
        Profile.create(directory, STRONG, {}, {"prekeys": {}})
        openers = [Profile.open(directory, STRONG) for _ in range(8)]
        failures: list[BaseException] = []

        def write(index: int, profile: Profile) -> None:
            try:
                for n in range(25):
                    with profile.lock:
                        profile.vault["prekeys"][f"{index}-{n}"] = "x"
                        profile.save()
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)

        threads = [threading.Thread(target=write, args=(i, p)) for i, p in enumerate(openers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(failures, [])
        self.assertEqual(len(Profile.open(directory, STRONG).vault["prekeys"]), 200)
        self.assertEqual(sorted(p.name for p in directory.iterdir()),
                         ["profile.json", "vault.json", "vault.lock"])


def lock_waiters(path: Path) -> int:
    """How many processes wait for the flock(2) on ``path`` (Linux's
    /proc/locks lists each waiter with "->" before it)."""
    st = os.stat(path)
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    with open("/proc/locks") as locks:
        return sum(1 for line in locks if "->" in line and file_id in line)


# Runs a command with SIGINT ignored and blocked, as a test run in the
# background may start its children (tests/client_process.py): the client
# process must hear Ctrl-C all the same.
DEAF_TO_SIGINT = [sys.executable, "-c",
                  "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                  "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}); "
                  "os.execv(sys.argv[1], sys.argv[1:])"]


class ProcessesTests(SQLiteMixin, TestCase):
    """Two ``listen``, ``keys prekeys`` and three ``send`` on one profile,
    all at once, as separate processes, while a contact writes to it."""

    SENDS = 3

    async def setUp(self) -> None:
        if not os.path.exists("/proc/locks"):
            raise SkipTest("needs Linux's /proc/locks to see who waits for the profile's lock")
        self.server = await start_server(self, serve=True)
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    def arguments(self, profile: str, *args: str) -> list[str]:
        passphrase = Path(f"{profile}.passphrase")
        passphrase.write_text(f"passphrase for {profile}")
        return ["--server", self.url, "--profile", profile, "--passphrase-file", str(passphrase),
                *args]

    def command(self, profile: str, *args: str) -> list[str]:
        return [*CLIENT, *self.arguments(profile, *args)]

    def ok(self, profile: str, *args: str) -> str:
        """A command before or after the concurrent part, through cli.main
        in this process (no other process then uses the profile)."""
        result = cli_in_process(self.arguments(profile, *args))
        assert result.returncode == 0, result.stderr
        return result.stdout

    async def test_nothing_lost(self) -> None:
        """The sends and the prekey top-up, started while this process holds
        the profile's lock, wait for it (and what this process saves under
        it is kept); then every message bob sends while they and two
        listens run is shown exactly once by each listen, opened and
        verified; every send succeeds and its message opens in history;
        afterwards every one-time prekey on the server still has its secret
        in the vault (bob's next messages, sealed to them, open), and
        nothing was logged as an error. With the lock broken, the writers
        do not wait, and what they saved meanwhile is lost to this
        process's save."""
        await deferToThread(self.scenario)

    def scenario(self) -> None:
        sends = self.SENDS
        alice = os.path.abspath(self.mktemp())
        self.ok(alice, "init")
        self.ok(alice, "register", "alice", "--prekeys", "30")
        bob, _ = Client.init(self.mktemp(), STRONG, self.url)
        self.addCleanup(bob.close)
        bob.register("bob", prekeys=5)
        bob.send("alice", "hello")  # the direct chat
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        listens = [subprocess.Popen([*DEAF_TO_SIGINT, *self.command(alice, "--json", "listen")],
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                    cwd=str(ROOT), env=env) for _ in range(2)]
        for listen in listens:
            self.addCleanup(lambda listen=listen: listen.poll() is None and listen.kill())
        seen: list[list[dict]] = [[], []]
        done = [threading.Event(), threading.Event()]

        def read(index: int) -> None:
            stdout = listens[index].stdout
            assert stdout is not None
            for text in stdout:
                message = json.loads(text)
                seen[index].append(message)
                if message.get("text") == "bob: done":
                    done[index].set()

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
        for reader in readers:
            reader.start()
        mine = Profile.open(alice, f"passphrase for {alice}")
        self.addCleanup(mine.close)
        try:
            # Both listening: their catch-up and prekey check are done.
            wait_for_sockets(self.server, "alice", 2)
            with mine.lock:
                others = [subprocess.Popen(self.command(alice, "send", "bob", f"alice: {n}"),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           stdin=subprocess.DEVNULL, text=True, cwd=str(ROOT),
                                           env=env) for n in range(sends)]
                others.append(subprocess.Popen(
                    self.command(alice, "keys", "prekeys", "--count", "120"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                    text=True, cwd=str(ROOT), env=env))
                # Every writer waits for the lock (or, were it broken, has
                # done its work and saved already).
                deadline = time.monotonic() + 60
                while (lock_waiters(mine.directory / LOCK_FILE) < len(others)
                       and any(p.poll() is None for p in others)):
                    self.assertLess(time.monotonic(), deadline, "the writers did not start")
                    time.sleep(0.01)
                mine.vault["savedUnderTheLock"] = True
                mine.save()
            for n in range(20):
                bob.send("alice", f"bob: {n}")
            for process in others:
                out, err = finish(process, 120)
                self.assertEqual(process.returncode, 0, err)
                self.assertNotIn("Traceback", err)
            bob.send("alice", "bob: done")
            for event in done:
                self.assertTrue(event.wait(60), f"a listen did not see everything: {seen}")
        finally:
            for listen in listens:
                listen.send_signal(signal.SIGINT)
            # A listen stops once its receipts are acknowledged and its prekey
            # top-up (if one runs) is saved: on a loaded machine, a while.
            errors = [finish(listen, 90)[1] for listen in listens]
        for index in range(2):
            # "hello" came before: the catch-up of the first listen to take
            # it marks it delivered, so the other may not be shown it.
            from_bob = [m for m in seen[index] if m["sender"] == "bob" and m["text"] != "hello"]
            texts = [m["text"] for m in from_bob]
            self.assertEqual(sorted(texts, key=lambda t: (len(t), t)),
                             sorted([*(f"bob: {n}" for n in range(20)), "bob: done"],
                                    key=lambda t: (len(t), t)), errors[index])
            self.assertTrue(all(m["verified"] for m in from_bob), from_bob)
            self.assertNotIn("Traceback", errors[index])
        with mine.lock:
            self.assertTrue(mine.vault.get("savedUnderTheLock"))
            secrets = set(mine.vault["prekeys"])
        # Every one-time prekey the server holds has its secret in the vault.
        published = blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(
            self.server.database.run_query(
                "SELECT key_id FROM one_time_prekeys WHERE user_id ="
                " (SELECT id FROM cyphr_identities WHERE cyphr_id = ?)", ("alice",))))
        self.assertGreater(len(published), 100)  # the top-up's are there
        self.assertEqual({str(key_id) for (key_id,) in published} - secrets, set())
        # And they open: bob seals to them, alice reads.
        remaining = json.loads(self.ok(alice, "--json", "keys", "prekeys", "--count", "1"))
        self.assertGreater(remaining["remaining"], 0)
        for n in range(5):
            bob.send("alice", f"bob later: {n}")
        history = json.loads(self.ok(alice, "--json", "history", "bob", "--limit", "100"))
        unopened = [m for m in history["messages"] if m["text"] is None]
        self.assertEqual(unopened, [])
        self.assertEqual(len([m for m in history["messages"] if m["sender"] == "alice"]), sends)
