"""
Push wake-ups end to end: registrations, the outbox and its drain, against
the strict RFC 8030 stand-in of tests/pushservice.py (it decrypts every
body with the subscription's key and checks VAPID), with real sockets for
devices that are online, on one node and across two.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.client.client import Client
from cyphr.store.messages import MessageStore, NotAMember, Outgoing
from cyphr.store.push import WakeUps
from tests.clients import PASSPHRASE
from tests.fcmservice import UNREGISTERED, FcmService
from tests.helpers import PostgresMixin, RealHTTP, SQLiteMixin, cli_in_process, start_server
from tests.test_metrics import scrape, value
from tests.pushservice import PushService, StandInSubscription
from tests.realtime import sessions_closed
from tests.test_realtime_cluster import ClusterMixin, Node
from tests.users import User


async def until(condition: Any, what: str, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class PushMixin(ClusterMixin):
    """A stand-in push service and servers allowed to reach it."""

    timeout = 120

    async def setUp(self) -> None:
        self.service = PushService(reactor)
        self.service.start()
        self.addCleanup(self.service.stop)

    async def serve(self, count: int = 1, **overrides: Any) -> list[Node]:
        """``count`` nodes, each allowed to reach the stand-in."""
        overrides["push_allow_endpoint"] = (self.service.origin,)
        # On PostgreSQL, a copy of a database already migrated: these tests
        # are of push, and a server migrating a fresh database costs
        # PostgreSQL about 0.3 s of work each time.
        database = getattr(self, "migrated_database_setting", self.database_setting)()
        nodes = await self.cluster(database, 1, **overrides)
        for _ in range(count - 1):
            nodes.append(await self.node(database, **overrides))
        return nodes

    async def registered(self, node: Node, user: User) -> StandInSubscription:
        subscription = self.service.subscribe()
        response = await node.http.put("/api/devices/me/push", {
            "kind": "webpush", "subscription": subscription.to_json()}, headers=user.auth())
        self.assertEqual(response.code, 200, response.body)
        return subscription

    async def send(self, node: Node, sender: User, recipient: User, text: str = "hello") -> None:
        response = await node.http.post("/api/messaging/send", {
            "recipientId": recipient.cyphr_id, "encryptedPayload": {"sealed": text}},
            headers=sender.auth())
        self.assertEqual(response.code, 201, response.body)

    async def drained(self, *nodes: Node) -> None:
        """Every wake-up queued so far has been sent (or given up). (A
        message's wake-ups are queued with it: by its 201, they are.)"""
        for node in nodes or self.nodes:
            push = node.server.push
            while push._tasks or push._draining is not None:
                await deferLater(reactor, 0.01, lambda: None)
            push.kick()
            while push._draining is not None:
                await push._draining

    def wake_ups(self, subscription: StandInSubscription) -> list[Any]:
        return self.service.received_for(subscription.id)


class PushTests(PushMixin):
    async def test_registration_and_bad_input(self) -> None:
        """A device registers a Web Push subscription and removes it; each bad
        registration is a clear 400 and stores nothing: an unknown kind, a
        subscription without keys, keys of the wrong size, an endpoint that
        is not https and not allowed, a kind this server cannot send (APNs
        without credentials); removing none is 404. The config tells the
        kinds and the VAPID key."""
        [node] = await self.serve()
        alice = await self.user(node, "alice")
        response = await node.http.get("/api/push/config", headers=alice.auth())
        self.assertEqual(response.json()["kinds"], ["unifiedpush", "webpush"])
        self.assertEqual(len(response.json()["vapidPublicKey"]), 87)
        good = self.service.subscribe().to_json()
        bad = [
            ({"kind": "carrier-pigeon", "subscription": good}, "INVALID_FIELD"),
            ({"kind": "webpush", "subscription": {"endpoint": good["endpoint"]}}, "INVALID_FIELD"),
            ({"kind": "webpush", "subscription": {**good, "keys": {"p256dh": "AAAA", "auth": "AAAA"}}},
             "INVALID_FIELD"),
            ({"kind": "webpush", "subscription": {**good, "endpoint": "http://10.0.0.1/push"}},
             "INVALID_PUSH_ENDPOINT"),
            ({"kind": "webpush", "subscription": {**good, "endpoint": "https://127.0.0.1/push"}},
             "INVALID_PUSH_ENDPOINT"),
            ({"kind": "apns", "token": "ab" * 32}, "PUSH_NOT_AVAILABLE"),
            ({"kind": "apns", "subscription": good}, "INVALID_FIELD"),
            ({"kind": "webpush", "subscription": good, "extra": 1}, "UNKNOWN_FIELD"),
        ]
        for body, code in bad:
            response = await node.http.put("/api/devices/me/push", body, headers=alice.auth())
            self.assertEqual((response.code, response.json()["code"]), (400, code), body)
        response = await node.http.delete("/api/devices/me/push", headers=alice.auth())
        self.assertEqual((response.code, response.json()["code"]), (404, "PUSH_NOT_REGISTERED"))
        response = await node.http.put("/api/devices/me/push", {"kind": "webpush", "subscription": good},
                                       headers=alice.auth())
        self.assertEqual(response.code, 200, response.body)
        response = await node.http.delete("/api/devices/me/push", headers=alice.auth())
        self.assertEqual(response.code, 200)
        rows = await node.server.database.run_query("SELECT COUNT(*) FROM push_registrations")
        self.assertEqual(rows, [(0,)])

    async def test_one_wake_up_until_the_device_connects(self) -> None:
        """A message to a device with no socket sends it exactly one wake-up,
        however many messages follow, until it connects; a connected device
        gets none; after it goes, the next message wakes it again. The
        wake-up names nothing: its body is an opaque counter, its headers
        carry no Cyphr ID, chat or content."""
        [node] = await self.serve()
        # Names too long to turn up by chance in the headers' random base64.
        alice = await self.user(node, "alice_wakes_bob")
        bob = await self.user(node, "bob_the_sleeper")
        subscription = await self.registered(node, bob)
        for n in range(3):
            await self.send(node, alice, bob, f"secret text {n}")
        await self.drained()
        [wake] = self.wake_ups(subscription)
        self.assertEqual(json.loads(wake.plaintext), {"n": 1})
        self.assertEqual(wake.headers["topic"], "cyphr-wake")
        self.assertEqual(wake.headers["urgency"], "high")
        seen = json.dumps(wake.headers).encode() + wake.plaintext
        for needle in (bob.cyphr_id, alice.cyphr_id, "secret text", bob.user_id):
            self.assertNotIn(needle.encode(), seen)

        client = await self.connect(node, bob)
        await self._no_outbox(node)
        await self.send(node, alice, bob, "while online")
        await self.drained()
        self.assertEqual(len(self.wake_ups(subscription)), 1)
        await client.disconnect()
        await sessions_closed(node.server)
        await self._no_connections(node)
        await self.send(node, alice, bob, "after")
        await self.drained()
        wakes = self.wake_ups(subscription)
        self.assertEqual(len(wakes), 2)
        self.assertEqual(json.loads(wakes[1].plaintext), {"n": 2})
        self.assertEqual(self.service.errors, [])

    async def test_wake_ups_are_queued_with_the_messages(self) -> None:
        """A batch of messages queues the wake-ups of the messages stored
        now in its own transaction: the recipient's device, not the sending
        one; none for a resend or a refused message; none at all when the
        batch fails."""
        [node] = await self.serve()
        alice, bob, carol = [await self.user(node, name) for name in ("alice", "bob", "carol")]
        await self.registered(node, alice)  # the sending device: never woken by its own send
        await self.registered(node, bob)
        await self.send(node, alice, bob)
        [(chat_id,)] = await node.server.database.run_query("SELECT id FROM chats")
        database = node.server.database
        await self.drained()
        await database.run_query("DELETE FROM push_outbox")  # as if bob's device connected

        store = MessageStore(database)
        now = int(node.server.clock.seconds() * 1000)
        wake_ups = WakeUps(now, now - 60_000)

        def outgoing(sender: User, client_id: str, message_type: str = "text") -> Outgoing:
            return Outgoing(str(uuid.uuid4()), chat_id, sender.cyphr_id, "{}", message_type,
                            client_id, now, sender_device=1)

        async def outbox() -> list[tuple[Any, ...]]:
            return list(await database.run_query("SELECT user_id, device_id FROM push_outbox"))

        stored = await store.store_batch([outgoing(alice, "c1"), outgoing(alice, "c2")], wake_ups)
        self.assertEqual(stored.woken, 1)  # bob's one device, once for the two
        self.assertEqual([str(user_id) for user_id, _ in await outbox()], [bob.user_id])
        await database.run_query("DELETE FROM push_outbox")
        stored = await store.store_batch([outgoing(alice, "c1"), outgoing(carol, "c3")], wake_ups)
        self.assertEqual(stored.woken, 0)  # a resend, and a sender who is no member
        self.assertIsInstance(stored.answers[1], NotAMember)
        self.assertEqual(await outbox(), [])
        with self.assertRaises(Exception):
            await store.store_batch([outgoing(alice, "c4"), outgoing(alice, "c5", "bogus")], wake_ups)
        self.assertEqual(await outbox(), [])

    async def _no_outbox(self, node: Node) -> None:
        for _ in range(500):
            rows = await node.server.database.run_query("SELECT COUNT(*) FROM push_outbox")
            if rows == [(0,)]:
                return
            await deferLater(reactor, 0.02, lambda: None)
        self.fail("the outbox kept a wake-up for a connected device")

    async def _no_connections(self, node: Node) -> None:
        for _ in range(500):
            rows = await node.server.database.run_query("SELECT COUNT(*) FROM device_connections")
            if rows == [(0,)]:
                return
            await deferLater(reactor, 0.02, lambda: None)
        self.fail("a device connection outlived its socket")

    async def test_socket_counts_keep_their_order(self) -> None:
        """Sockets of one device that come and go at once are counted in the
        order they came, on a database whose connections may run them in
        any order: none is left counted, so the device is woken again."""
        [node] = await self.serve()
        bob = await self.user(node, "bob")
        push = node.server.push
        for _ in range(20):
            push.connected(bob.user_id, 1)
            push.disconnected(bob.user_id, 1)
        push.connected(bob.user_id, 1)
        push.connected(bob.user_id, 1)
        push.disconnected(bob.user_id, 1)
        while push._tasks:
            await next(iter(push._tasks))
        rows = await node.server.database.run_query("SELECT sockets FROM device_connections")
        self.assertEqual(rows, [(1,)])
        push.disconnected(bob.user_id, 1)
        while push._tasks:
            await next(iter(push._tasks))
        await self._no_connections(node)

    async def test_failures(self) -> None:
        """A subscription the service calls gone (410) is dropped; 500 is tried
        again, and sent once the service answers; a refusal of the request
        (400) gives the wake-up up but keeps the registration."""
        [node] = await self.serve()
        alice = await self.user(node, "alice")
        bob, carol, dave = [await self.user(node, n) for n in ("bob", "carol", "dave")]
        gone, flaky, refusing = [await self.registered(node, u) for u in (bob, carol, dave)]
        self.service.answer(gone.id, 410)
        self.service.answer(flaky.id, 500)
        self.service.answer(refusing.id, 400)
        for user in (bob, carol, dave):
            await self.send(node, alice, user)
        await self.drained()
        rows = await node.server.database.run_query(
            "SELECT i.cyphr_id FROM push_registrations r JOIN cyphr_identities i ON i.id = r.user_id")
        self.assertEqual(sorted(row[0] for row in rows), [carol.cyphr_id, dave.cyphr_id])
        self.service.answer(flaky.id, 201)
        await node.server.database.run_operation("UPDATE push_outbox SET due_at = 0")
        await self.drained()
        self.assertEqual([len(self.wake_ups(s)) for s in (gone, flaky, refusing)], [1, 2, 1])
        rows = await node.server.database.run_query(
            "SELECT sent_at IS NOT NULL FROM push_outbox")
        self.assertEqual(rows, [(True,)])
        http = RealHTTP(node.url)
        self.addCleanup(http.close)
        samples = await scrape(http)
        self.assertEqual(value(samples, "cyphr_push_sent_total", kind="webpush"), 1)
        for outcome in ("gone", "retry", "refused"):
            self.assertEqual(value(samples, "cyphr_push_failed_total", kind="webpush",
                                   outcome=outcome), 1, outcome)
        self.assertEqual(value(samples, "cyphr_push_queued_total"), 3)


class SQLitePushTests(SQLiteMixin, PushTests, TestCase):
    pass


class PostgresPushTests(PostgresMixin, PushTests, TestCase):
    async def test_a_device_online_on_another_node_gets_none(self) -> None:
        """Bob's device holds a socket on node B: a message sent through node
        A wakes nothing; once the socket goes, one does."""
        a_node, b_node = await self.serve(count=2)
        alice, bob = await self.user(a_node, "alice"), await self.user(a_node, "bob")
        subscription = await self.registered(a_node, bob)
        client = await self.connect(b_node, bob)
        await self.send(a_node, alice, bob)
        await self.drained()
        self.assertEqual(self.wake_ups(subscription), [])
        await client.disconnect()
        await sessions_closed(b_node.server)
        await self._no_connections(b_node)
        await self.send(a_node, alice, bob)
        await self.drained()
        self.assertEqual(len(self.wake_ups(subscription)), 1)

    async def test_a_wake_up_claimed_by_a_node_that_died_is_sent_by_another(self) -> None:
        """Node A claims a wake-up and dies before the service answers (it
        hangs); once the claim runs out, node B sends it: nothing queued is
        lost."""
        a_node, b_node = await self.serve(count=2)
        alice, bob = await self.user(a_node, "alice"), await self.user(a_node, "bob")
        subscription = await self.registered(a_node, bob)
        self.service.hang(subscription.id)
        await self.send(a_node, alice, bob)
        await until(lambda: len(self.wake_ups(subscription)) == 1, "node A's attempt")
        rows = await a_node.server.database.run_query("SELECT attempts FROM push_outbox")
        self.assertEqual(rows, [(1,)])
        await a_node.server.service.stopService()
        self.service.answer(subscription.id, 201)
        # The claim ran out (as 30 s later).
        await b_node.server.database.run_operation("UPDATE push_outbox SET due_at = 0")
        await self.drained(b_node)
        self.assertEqual(len(self.wake_ups(subscription)), 2)
        rows = await b_node.server.database.run_query(
            "SELECT sent_at IS NOT NULL, attempts FROM push_outbox")
        self.assertEqual(rows, [(True, 2)])


class ClientPushTests(SQLiteMixin, TestCase):
    """The reference client registers a UnifiedPush endpoint with
    cyphr-client push register; a message to it while it has no socket
    wakes it with an empty POST (no keys: nothing to seal)."""

    timeout = 120

    async def setUp(self) -> None:
        self.service = PushService(reactor)
        self.service.start()
        self.addCleanup(self.service.stop)
        self.server = await start_server(self, serve=True,
                                         push_allow_endpoint=(self.service.origin,))
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.clients: list[Client] = []
        self.addCleanup(lambda: [client.close() for client in self.clients])

    async def registered(self, cyphr_id: str) -> Client:
        client, _ = await deferToThread(Client.init, os.path.abspath(self.mktemp()), PASSPHRASE,
                                        self.url)
        self.clients.append(client)
        await deferToThread(client.register, cyphr_id, None, 2)
        return client

    async def test_push_register_command(self) -> None:
        """push register, status and unregister through the command line; a
        wake-up reaches the registered endpoint, with no body."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        passphrase = Path(f"{bob.profile.directory}.passphrase")
        passphrase.write_text(PASSPHRASE)

        async def cli(*args: str) -> Any:
            result = await deferToThread(cli_in_process, [
                "--server", self.url, "--profile", str(bob.profile.directory),
                "--passphrase-file", str(passphrase), *args])
            self.assertEqual(result.returncode, 0, result.stderr)
            return result

        subscription = self.service.subscribe(keys=False)
        await cli("push", "register", "--endpoint", subscription.endpoint)
        status = json.loads((await cli("--json", "push", "status")).stdout)
        self.assertEqual(status["kinds"], ["unifiedpush", "webpush"])
        await deferToThread(alice.send, "bob", "wake up")
        await until(lambda: self.wake_ups(subscription), "the wake-up")
        [wake] = self.wake_ups(subscription)
        self.assertEqual(wake.plaintext, b"")
        await cli("push", "unregister")
        rows = await self.server.database.run_query("SELECT COUNT(*) FROM push_registrations")
        self.assertEqual(rows, [(0,)])
        self.assertEqual(self.service.errors, [])

    def wake_ups(self, subscription: StandInSubscription) -> list[Any]:
        return self.service.received_for(subscription.id)


class FcmPushTests(SQLiteMixin, PushMixin, TestCase):
    """FCM through the whole server, against the strict FCM and OAuth
    stand-ins of tests/fcmservice.py."""

    async def register_fcm(self, node: Node, fcm: Any, users: list[User]) -> dict[str, str]:
        """Each user's device registered with a token of the FCM stand-in."""
        tokens = {}
        for user in users:
            tokens[user.cyphr_id] = fcm.device()
            response = await node.http.put("/api/devices/me/push", {
                "kind": "fcm", "token": tokens[user.cyphr_id]}, headers=user.auth())
            self.assertEqual(response.code, 200, response.body)
        return tokens

    def fcm(self) -> tuple[Any, Path]:
        """The FCM stand-ins, and a service account file for them."""
        fcm = FcmService(reactor)
        fcm.start()
        self.addCleanup(fcm.stop)
        credentials = Path(self.mktemp())
        credentials.write_text(json.dumps(fcm.service_account()))
        return fcm, credentials

    async def test_fcm_wake_up(self) -> None:
        """A device registered with an FCM token is woken once, data-only,
        naming nothing; a token FCM calls unregistered is dropped."""
        fcm, credentials = self.fcm()
        [node] = await self.serve(fcm_credentials=str(credentials), fcm_endpoint=fcm.base_url)
        alice, bob, carol = [await self.user(node, n) for n in ("alice", "bob", "carol")]
        tokens = await self.register_fcm(node, fcm, [bob, carol])
        fcm.answer(tokens[carol.cyphr_id], UNREGISTERED)
        for user in (bob, carol, bob):
            await self.send(node, alice, user, "secret text")
        await self.drained()
        [wake] = fcm.received_for(tokens[bob.cyphr_id])
        self.assertEqual(wake.message["data"], {"n": "1"})
        self.assertNotIn("notification", wake.message)
        for needle in (bob.cyphr_id, alice.cyphr_id, "secret text"):
            self.assertNotIn(needle, json.dumps(wake.message))
        rows = await node.server.database.run_query("SELECT kind FROM push_registrations")
        self.assertEqual(rows, [("fcm",)])
        self.assertEqual(fcm.errors, [])

    async def test_gateway_mode(self) -> None:
        """A server without FCM credentials hands its FCM wake-ups to a
        gateway server that has them: the wake-up arrives; a token the
        service calls dead comes back rejected and is dropped; a wrong
        secret is 401, and a server that is no gateway answers 404."""
        fcm, credentials = self.fcm()
        secret = "g" * 40
        gateway = await start_server(self, serve=True, fcm_credentials=str(credentials),
                                     fcm_endpoint=fcm.base_url, push_gateway_accept=(secret,))
        [port] = [await d for d in gateway.listening()]
        gateway_url = f"http://127.0.0.1:{port.getHost().port}"
        [node] = await self.serve(push_gateway_url=gateway_url, push_gateway_secret=secret)
        response = await node.http.get("/api/push/config", headers=(await self.user(node, "zed")).auth())
        self.assertEqual(response.json()["kinds"], ["apns", "fcm", "unifiedpush", "webpush"])
        alice, bob, carol = [await self.user(node, n) for n in ("alice", "bob", "carol")]
        tokens = await self.register_fcm(node, fcm, [bob, carol])
        fcm.answer(tokens[carol.cyphr_id], UNREGISTERED)
        for user in (bob, carol):
            await self.send(node, alice, user, "secret text")
        await self.drained()
        [wake] = fcm.received_for(tokens[bob.cyphr_id])
        self.assertEqual(wake.message["data"], {"n": "1"})
        rows = await node.server.database.run_query("SELECT kind FROM push_registrations")
        self.assertEqual(rows, [("fcm",)])
        http = RealHTTP(gateway_url)
        self.addCleanup(http.close)
        body = {"notification": {"kind": "fcm", "token": tokens[bob.cyphr_id], "counter": 2}}
        response = await http.post("/api/push/gateway", body,
                                   headers={b"Authorization": [b"Bearer " + b"x" * 40]})
        self.assertEqual((response.code, response.json()["code"]), (401, "INVALID_GATEWAY_SECRET"))
        response = await node.http.post("/api/push/gateway", body,
                                        headers={b"Authorization": [secret.encode()]})
        self.assertEqual(response.code, 404)
        self.assertEqual(fcm.errors, [])


class ApnsPushTests(SQLiteMixin, PushMixin, TestCase):
    """APNs through the whole server, against the strict HTTP/2 stand-in of
    tests/apnsservice.py (TLS from a test CA, the provider token checked)."""

    async def test_apns_wake_up(self) -> None:
        """A device registered with an APNs token is woken once with an alert
        that names nothing (a localization key, mutable-content, the
        counter); a token Apple calls unregistered is dropped."""
        from tests.apnsservice import ApnsService

        apns = ApnsService()
        apns.start()
        self.addCleanup(apns.stop)
        key = Path(self.mktemp())
        key.write_bytes(apns.key_pem)
        [node] = await self.serve(apns_key_file=str(key), apns_key_id=apns.key_id,
                                  apns_team_id=apns.team_id, apns_topic="org.cyphr.app",
                                  apns_endpoint=apns.endpoint, apns_sandbox_endpoint=apns.endpoint,
                                  apns_ca_file=apns.ca_path)
        alice, bob, carol = [await self.user(node, n) for n in ("alice", "bob", "carol")]
        tokens = {bob.cyphr_id: os.urandom(32).hex(), carol.cyphr_id: os.urandom(32).hex()}
        for user in (bob, carol):
            response = await node.http.put("/api/devices/me/push", {
                "kind": "apns", "token": tokens[user.cyphr_id]}, headers=user.auth())
            self.assertEqual(response.code, 200, response.body)
        apns.answer(tokens[carol.cyphr_id], 410, "Unregistered")
        for user in (bob, carol, bob):
            await self.send(node, alice, user, "secret text")
        await self.drained()
        [wake] = apns.received_for(tokens[bob.cyphr_id])
        body = json.loads(wake.body)
        self.assertEqual(body["aps"]["mutable-content"], 1)
        self.assertEqual(body["n"], 1)
        self.assertEqual(wake.headers["apns-topic"], "org.cyphr.app")
        self.assertEqual(wake.headers["apns-collapse-id"], "cyphr-wake")
        for needle in (bob.cyphr_id, alice.cyphr_id, "secret text"):
            self.assertNotIn(needle, wake.body.decode())
        rows = await node.server.database.run_query("SELECT kind FROM push_registrations")
        self.assertEqual(rows, [("apns",)])
        self.assertEqual(apns.errors, [])
