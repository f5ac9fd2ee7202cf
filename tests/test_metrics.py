"""
Prometheus metrics at /metrics: scraped over real ports before and after
real work (REST and Socket.IO with real tokens), on both engines.
"""

from __future__ import annotations

import uuid
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from cyphr.api.http import route_template
from cyphr.metrics import Histogram
from tests.helpers import PostgresMixin, RealHTTP, SQLiteMixin, start_server
from tests.realtime import SioClient, sessions_closed, until
from tests.users import User

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
RATE_LIMITED = "RATE_LIMITED"


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: RealHTTP) -> Samples:
    response = await http.get("/metrics")
    assert response.code == 200, response.body
    assert response.header("Content-Type").startswith("text/plain"), response.header("Content-Type")
    return parse(response.body.decode("utf-8"))


class MetricsMixin:
    timeout = 120

    async def serve(self, **overrides: Any) -> tuple[Any, int, RealHTTP]:
        server = await start_server(self, serve=True, **overrides)
        port = (await server.listening()[0]).getHost().port
        return server, port, RealHTTP.for_port(self, port)

    async def test_work_moves_the_right_series(self) -> None:
        """REST and Socket.IO work moves each series by what was done: requests by route
        template and status, messages sent, delivered and read, batches, sessions, users
        online, rate-limit refusals and database failures; no label holds an id or a path."""
        server, port, http = await self.serve(rate_limit_search=(1, 3600),
                                              realtime_event_rate=(12, 3600))
        suffix = uuid.uuid4().hex[:8]
        alice, bob = User(f"m_alice_{suffix}"), User(f"m_bob_{suffix}")
        before = await scrape(http)

        await alice.register(http)
        await bob.register(http)
        self.assertEqual((await alice.login(http)).code, 200)
        sent = []
        for n in range(3):
            response = await http.post("/api/messaging/send", {
                "recipientId": bob.cyphr_id, "encryptedPayload": {"n": n}}, headers=alice.auth())
            self.assertEqual(response.code, 201, response.body)
            sent.append(response.json())
        chat_id = sent[0]["chatId"]
        history = await http.get(f"/api/messaging/chat/{chat_id}", headers=bob.auth())
        self.assertEqual(history.code, 200)
        self.assertEqual((await http.get(f"/api/nothing/{chat_id}")).code, 404)
        searches = [await http.get("/api/cyphr-id/search?q=m_", headers=alice.auth()) for _ in range(2)]
        self.assertEqual([r.code for r in searches], [200, 429])
        try:
            await server.database.run_query("SELECT nothing FROM no_such_table")
        except Exception:
            pass
        else:
            self.fail("the statement should have failed")

        client = SioClient(f"http://127.0.0.1:{port}", transports=["websocket"])
        self.addCleanup(self._disconnect, client, server)
        await client.connect({"token": bob.token})
        await client.wait_for("sync_complete")
        self.assertEqual(len(client.events("new_message")), 3)
        online = await scrape(http)
        self.assertEqual(value(online, "cyphr_realtime_sessions", transport="websocket"), 1)
        self.assertEqual(value(online, "cyphr_realtime_sessions", transport="polling"), 0)
        self.assertEqual(value(online, "cyphr_realtime_users"), 1)
        self.assertEqual(value(online, "cyphr_realtime_authenticated_sockets"), 1)

        for n in range(2):
            ack = await client.call("send_message", {"chatId": chat_id, "encryptedPayload": {"b": n}})
            self.assertTrue(ack["success"], ack)
        first = {"messageId": sent[0]["messageId"], "chatId": chat_id}
        for _ in range(2):  # the second acknowledgement of one message is not news
            self.assertTrue((await client.call("message_delivered", first))["success"])
        self.assertTrue((await client.call("message_read", {"messageId": sent[1]["messageId"]}))["success"])
        self.assertTrue((await client.call("message_read", {"chatId": chat_id, "upToSeq": 3}))["success"])
        acks = []
        while not acks or acks[-1].get("code") != RATE_LIMITED:
            acks.append(await client.call("typing", {"chatId": chat_id, "isTyping": True}))
            self.assertLess(len(acks), 20, acks)
        self.assertTrue(all(a["success"] for a in acks[:-1]), acks)

        after = await scrape(http)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        requests = "cyphr_http_requests_total"
        self.assertEqual(moved(requests, method="POST", route="/api/cyphr-id/register", status="201"), 2)
        self.assertEqual(moved(requests, method="POST", route="/api/cyphr-id/login", status="200"), 1)
        self.assertEqual(moved(requests, method="POST", route="/api/cyphr-id/challenge", status="200"), 3)
        self.assertEqual(moved(requests, method="POST", route="/api/messaging/send", status="201"), 3)
        self.assertEqual(moved(requests, method="GET", route="/api/messaging/chat/:chatId", status="200"), 1)
        self.assertEqual(moved(requests, method="GET", route="/api/cyphr-id/search", status="200"), 1)
        self.assertEqual(moved(requests, method="GET", route="/api/cyphr-id/search", status="429"), 1)
        self.assertEqual(moved(requests, method="GET", route="unmatched", status="404"), 1)
        self.assertEqual(moved(requests, method="GET", route="/metrics", status="200"), 2)
        self.assertEqual(moved("cyphr_http_request_duration_seconds_count", route="/api/messaging/send"), 3)
        self.assertEqual(moved("cyphr_http_request_duration_seconds_bucket", route="/api/messaging/send",
                               le="+Inf"), 3)
        self.assertGreater(moved("cyphr_http_request_duration_seconds_sum", route="/api/messaging/send"), 0)

        self.assertEqual(moved("cyphr_messages_sent_total"), 5)
        self.assertEqual(moved("cyphr_messages_delivered_total"), 1)
        self.assertEqual(moved("cyphr_messages_read_total"), 2)
        batches = moved("cyphr_send_batch_size_count")
        self.assertTrue(1 <= batches <= 5, batches)
        self.assertEqual(moved("cyphr_send_batch_size_sum"), 5)
        self.assertEqual(moved("cyphr_send_batch_duration_seconds_count"), batches)

        self.assertEqual(moved("cyphr_rate_limited_total", limit="search"), 1)
        self.assertEqual(moved("cyphr_rate_limited_total", limit="realtime_events"), 1)
        self.assertEqual(moved("cyphr_rate_limited_total", limit="send"), 0)

        engine = server.database.engine
        self.assertEqual(moved("cyphr_db_failures_total", engine=engine, kind="error"), 1)
        self.assertEqual(value(after, "cyphr_db_failures_total", engine=engine, kind="connection_lost"), 0)
        size = 1 if engine == "sqlite" else server.config.db_pool_size
        self.assertEqual(value(after, "cyphr_db_pool_size", engine=engine), size)
        self.assertGreaterEqual(value(after, "cyphr_db_pool_up", engine=engine), 1)
        self.assertEqual(value(after, "cyphr_info", engine=engine, version=__import__("cyphr").__version__), 1)
        if engine == "sqlite":  # one process: nothing is published
            self.assertEqual(value(after, "cyphr_bus_events_published_total"), 0)
            self.assertEqual(value(after, "cyphr_bus_events_out_total"), 0)
        else:  # presence and messages, for the other processes
            self.assertGreater(moved("cyphr_bus_events_published_total"), 0)

        # No label holds an id, a token, a user or a raw path.
        router = server.root._router
        templates = {route_template(rule.rule) for api in router.apis for rule in api.app.url_map.iter_rules()}
        secrets = {chat_id, alice.cyphr_id, bob.cyphr_id, alice.token, bob.token, alice.user_id,
                   *(m["messageId"] for m in sent)}
        for (name, labels), _ in after.items():
            for label, text in labels:
                for secret in secrets:
                    self.assertNotIn(secret, text, (name, labels))
                if label == "route":
                    self.assertIn(text, templates | {"unmatched", "/metrics", "/socket.io/"}, name)

        await client.disconnect()
        await sessions_closed(server)
        gone = await scrape(http)
        self.assertEqual(value(gone, "cyphr_realtime_sessions", transport="websocket"), 0)
        self.assertEqual(value(gone, "cyphr_realtime_users"), 0)

    async def _disconnect(self, client: SioClient, server: Any) -> None:
        if client.sio.connected:
            await client.disconnect()
        await sessions_closed(server)

    async def test_polling_sessions(self) -> None:
        """A long-polling session is counted under its transport, and its requests under /socket.io/."""
        server, port, http = await self.serve()
        user = User(f"m_poll_{uuid.uuid4().hex[:8]}")
        await user.register(http)
        client = SioClient(f"http://127.0.0.1:{port}", transports=["polling"])
        self.addCleanup(self._disconnect, client, server)
        await client.connect({"token": user.token})
        await client.wait_for("sync_complete")
        samples = await scrape(http)
        self.assertEqual(value(samples, "cyphr_realtime_sessions", transport="polling"), 1)
        self.assertEqual(value(samples, "cyphr_realtime_sessions", transport="websocket"), 0)
        self.assertGreaterEqual(
            value(samples, "cyphr_http_requests_total", method="POST", route="/socket.io/", status="200"), 1)

    async def test_metrics_listen(self) -> None:
        """With --metrics-listen, /metrics is served there only: the public port answers 404
        for it, and the metrics port serves nothing else."""
        server, port, http = await self.serve(metrics_listen=("tcp:0:interface=127.0.0.1",))
        metrics_port = (await server.metrics_listening()[0]).getHost().port
        self.assertNotEqual(metrics_port, port)
        public = await http.get("/metrics")
        self.assertEqual(public.code, 404)
        self.assertEqual(public.json()["code"], "NOT_FOUND")
        private = RealHTTP.for_port(self, metrics_port)
        samples = await scrape(private)
        self.assertEqual(value(samples, "cyphr_http_requests_total", method="GET", route="unmatched",
                               status="404"), 1)
        # Scrapes on the metrics port are not counted among the API's requests.
        self.assertEqual(value(samples, "cyphr_http_requests_total", method="GET", route="/metrics",
                               status="200"), 0)
        for path in ("/health", "/api/health", "/metrics/x", "/"):
            response = await private.get(path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(response.json()["code"], "NOT_FOUND")

    async def test_metrics_methods(self) -> None:
        """/metrics takes GET (and HEAD); anything else is 405 in the contract's format."""
        server, port, http = await self.serve()
        response = await http.post("/metrics", {})
        self.assertEqual(response.code, 405)
        self.assertEqual(response.header("Allow"), "GET, HEAD")
        self.assertFalse(response.json()["success"])
        self.assertEqual((await http.request("HEAD", "/metrics")).code, 200)


class SQLiteMetricsTests(SQLiteMixin, MetricsMixin, TestCase):
    pass


class PostgresMetricsTests(PostgresMixin, MetricsMixin, TestCase):
    async def test_bus_events_between_processes(self) -> None:
        """Two processes on one database: what one sends with NOTIFY the other counts as received."""
        database = self.migrated_database_setting()
        shared = {"jwt_secret": "j" * 40, "fingerprint_key": "f" * 40, "totp_key": "t" * 40,
                  "push_vapid_key": "v" * 40}
        a, a_port, a_http = await self.serve(database=database, node_id="metrics-a", **shared)
        await until(lambda: a.bus.listening, "LISTEN on a")
        b, b_port, b_http = await self.serve(database=database, node_id="metrics-b", **shared)
        await until(lambda: b.bus.listening, "LISTEN on b")
        # Each process publishes a heartbeat on start and on each presence change:
        # a user registering on b and connecting there is heard by a.
        user = User(f"m_bus_{uuid.uuid4().hex[:8]}")
        await user.register(b_http)
        client = SioClient(f"http://127.0.0.1:{b_port}", transports=["websocket"])
        self.addCleanup(self._disconnect, client, b)
        await client.connect({"token": user.token})
        await client.wait_for("sync_complete")
        await until(lambda: a.bus.received >= 1 and b.bus.sent >= 1, "events to cross")
        received_before = a.bus.received
        a_samples, b_samples = await scrape(a_http), await scrape(b_http)
        received_after = a.bus.received
        self.assertGreaterEqual(value(a_samples, "cyphr_bus_events_in_total"), 1)
        self.assertGreaterEqual(value(b_samples, "cyphr_bus_events_out_total"), 1)
        # Nothing is published before the database is ready: none dropped.
        self.assertEqual(value(b_samples, "cyphr_bus_events_dropped_total"), 0)
        self.assertEqual(value(a_samples, "cyphr_bus_events_dropped_total"), 0)
        # Heartbeats keep coming: the scrape saw the count of some moment
        # between the two readings.
        self.assertGreaterEqual(value(a_samples, "cyphr_bus_events_in_total"), received_before)
        self.assertLessEqual(value(a_samples, "cyphr_bus_events_in_total"), received_after)


class HistogramTests(TestCase):
    def test_buckets(self) -> None:
        """A value on a bound falls in that bound's bucket; buckets are cumulative, +Inf last."""
        histogram = Histogram((1, 5))
        for observation in (0.5, 1, 3, 5, 7):
            histogram.observe(observation)
        self.assertEqual(histogram.buckets(), [("1.0", 2), ("5.0", 4), ("+Inf", 5)])
        self.assertEqual((histogram.count, histogram.total), (5, 16.5))
