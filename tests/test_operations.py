"""GET /api/ice-servers and GET /api/admin/zero-storage-status, on both engines."""

from __future__ import annotations

import base64
import hashlib
import hmac

from twisted.trial.unittest import TestCase

from cyphr.config import ConfigError
from tests.helpers import (
    InProcessHTTP,
    PostgresMixin,
    SQLiteMixin,
    fixed_clock,
    make_config,
    start_server,
)
from tests.users import User

TURN_SECRET = "t" * 40
ADMIN_TOKEN = "a-very-long-operator-token-0123456789abcdef"


def coturn_credential(secret: str, username: str) -> str:
    """What coturn computes for a TURN REST username (use-auth-secret)."""
    return base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()


class IceServersTestsMixin:
    async def serve(self, **overrides: object) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock, **overrides)
        self.http = InProcessHTTP.for_server(self.server)
        self.alice = User("alice")
        await self.alice.register(self.http)

    async def test_stun_and_turn(self) -> None:
        """STUN as configured; TURN with username "expiry:userId" (expiry from the server's clock plus
        turn_ttl) and the credential coturn expects for it."""
        await self.serve(stun_urls=("stun:stun.example.com:3478",),
                         turn_urls=("turn:turn.example.com:3478?transport=udp", "turns:turn.example.com:5349"),
                         turn_secret=TURN_SECRET, turn_ttl=3600)
        self.clock.advance(10)
        response = await self.http.get("/api/ice-servers", headers=self.alice.auth())
        self.assertEqual(response.code, 200, response.body)
        body = response.json()
        self.assertEqual(body["success"], True)
        self.assertEqual(body["ttl"], 3600)
        stun, turn = body["iceServers"]
        self.assertEqual(stun, {"urls": ["stun:stun.example.com:3478"]})
        self.assertEqual(turn["urls"], ["turn:turn.example.com:3478?transport=udp",
                                        "turns:turn.example.com:5349"])
        expiry = int(self.clock.seconds()) + 3600
        self.assertEqual(turn["username"], f"{expiry}:{self.alice.user_id}")
        self.assertEqual(turn["credential"], coturn_credential(TURN_SECRET, turn["username"]))
        self.assertNotEqual(turn["credential"], coturn_credential("x" * 40, turn["username"]))

    async def test_no_turn_without_secret(self) -> None:
        """Without turn_secret no TURN entry is handed out, only STUN."""
        await self.serve(stun_urls=("stun:stun.example.com:3478",))
        response = await self.http.get("/api/ice-servers", headers=self.alice.auth())
        self.assertEqual(response.json()["iceServers"], [{"urls": ["stun:stun.example.com:3478"]}])

    async def test_nothing_configured(self) -> None:
        """With the defaults the list is empty (no public STUN server is named for the operator)."""
        await self.serve()
        response = await self.http.get("/api/ice-servers", headers=self.alice.auth())
        self.assertEqual(response.json(), {"success": True, "iceServers": [], "ttl": 86400})

    async def test_needs_a_token(self) -> None:
        """Without a token, or with a bad one, the answer is 401 and holds no credential."""
        await self.serve(turn_urls=("turn:turn.example.com",), turn_secret=TURN_SECRET)
        response = await self.http.get("/api/ice-servers")
        self.assertEqual((response.code, response.json()["code"]), (401, "UNAUTHORIZED"))
        response = await self.http.get("/api/ice-servers", headers=self.alice.auth("not.a.token"))
        self.assertEqual((response.code, response.json()["code"]), (401, "INVALID_TOKEN"))
        self.assertNotIn(b"credential", response.body)


class SQLiteIceServersTests(SQLiteMixin, IceServersTestsMixin, TestCase):
    pass


class PostgresIceServersTests(PostgresMixin, IceServersTestsMixin, TestCase):
    pass


class TurnSettingsTests(SQLiteMixin, TestCase):
    def test_turn_urls_need_a_secret(self) -> None:
        """turn_urls without turn_secret is refused at start, not silently ignored."""
        with self.assertRaises(ConfigError) as caught:
            make_config(self, turn_urls=("turn:turn.example.com",))
        self.assertIn("turn_secret", str(caught.exception))

    def test_malformed_urls(self) -> None:
        """A STUN or TURN URL of the wrong scheme or shape is refused."""
        for overrides in ({"stun_urls": ("turn:x.example",)}, {"stun_urls": ("http://x.example",)},
                          {"turn_urls": ("stun:x.example",), "turn_secret": TURN_SECRET},
                          {"turn_urls": ("turn:x.example?transport=sctp",), "turn_secret": TURN_SECRET}):
            self.assertRaises(ConfigError, make_config, self, **overrides)

    def test_short_secrets(self) -> None:
        """turn_secret and admin_token are held to 32 characters like the other secrets."""
        self.assertRaises(ConfigError, make_config, self, turn_secret="short")
        self.assertRaises(ConfigError, make_config, self, admin_token="short")


class ZeroStorageTestsMixin:
    URL = "/api/admin/zero-storage-status"

    def admin(self, token: str = ADMIN_TOKEN) -> dict[bytes, list[bytes]]:
        return {b"Authorization": [f"Bearer {token}".encode()]}

    async def test_not_there_without_a_token_setting(self) -> None:
        """Without admin_token the route answers exactly as a route that does not exist."""
        server = await start_server(self)
        http = InProcessHTTP.for_server(server)
        response = await http.get(self.URL, headers=self.admin())
        unknown = await http.get("/api/admin/no-such-route")
        self.assertEqual(response.code, 404)
        self.assertEqual(response.json(), {"success": False, "code": "NOT_FOUND",
                                           "error": f"No route for GET {self.URL}"})
        self.assertEqual(unknown.json()["error"], "No route for GET /api/admin/no-such-route")

    async def test_token_required(self) -> None:
        """With admin_token set: no bearer token is 401 ADMIN_TOKEN_REQUIRED, a wrong one (or a
        user's session token) 401 INVALID_ADMIN_TOKEN."""
        server = await start_server(self, admin_token=ADMIN_TOKEN)
        http = InProcessHTTP.for_server(server)
        alice = User("alice")
        await alice.register(http)
        cases = [({}, "ADMIN_TOKEN_REQUIRED"), ({b"Authorization": [b"Basic abc"]}, "ADMIN_TOKEN_REQUIRED"),
                 (self.admin(ADMIN_TOKEN[:-1]), "INVALID_ADMIN_TOKEN"),
                 (self.admin(ADMIN_TOKEN + "x"), "INVALID_ADMIN_TOKEN"),
                 (alice.auth(), "INVALID_ADMIN_TOKEN")]
        for headers, code in cases:
            response = await http.get(self.URL, headers=headers)
            self.assertEqual((response.code, response.json()["code"]), (401, code), headers)
            self.assertNotIn(b"counts", response.body)

    async def test_report(self) -> None:
        """The report lists what is and is not stored, and counts the rows of every table of the
        schema as it is in the database, a table added after the code was written included."""
        server = await start_server(self, admin_token=ADMIN_TOKEN)
        http = InProcessHTTP.for_server(server)
        alice, bob = User("alice"), User("bob")
        await alice.register(http)
        await bob.register(http)
        sent = await http.post("/api/messaging/send", {"recipientId": "bob", "encryptedPayload": {"c": "x"}},
                               headers=alice.auth())
        self.assertEqual(sent.code, 201)
        await server.database.run_query("CREATE TABLE added_later (id INTEGER PRIMARY KEY)")
        await server.database.run_query("INSERT INTO added_later (id) VALUES (1)")
        await server.database.run_query("INSERT INTO added_later (id) VALUES (2)")

        response = await http.get(self.URL, headers=self.admin())
        self.assertEqual(response.code, 200, response.body)
        body = response.json()
        self.assertEqual(body["success"], True)
        self.assertEqual(body["engine"], self.engine)
        self.assertEqual(body["schemaVersion"], server.database.schema_version)
        self.assertIn("message plaintext", body["neverStores"])
        self.assertIn("private keys of any kind (identity, ML-KEM, Stellar)", body["neverStores"])
        self.assertIn("keyed hashes (HMAC-SHA256) of device fingerprints", body["stores"])
        counts = body["counts"]
        self.assertEqual(counts["cyphr_identities"], 2)
        self.assertEqual(counts["messages"], 1)
        self.assertEqual(counts["chats"], 1)
        self.assertEqual(counts["chat_participants"], 2)
        self.assertEqual(counts["auth_challenges"], 2)
        self.assertEqual(counts["added_later"], 2)
        self.assertNotIn("schema_version", counts)
        # Every table once: on PostgreSQL the 100 partitions of messages are not listed.
        self.assertFalse([name for name in counts if name.startswith("messages_")])
        self.assertLessEqual({"one_time_prekeys", "totp_secrets", "wallet_links", "revoked_tokens",
                              "message_receipts", "retired_cyphr_ids", "message_stream"}, set(counts))

    async def test_database_down(self) -> None:
        """Without a database the report is 503 DATABASE_UNAVAILABLE."""
        server = await start_server(self, admin_token=ADMIN_TOKEN)
        http = InProcessHTTP.for_server(server)
        await server.database.close()
        response = await http.get(self.URL, headers=self.admin())
        self.assertEqual((response.code, response.json()["code"]), (503, "DATABASE_UNAVAILABLE"))


class SQLiteZeroStorageTests(SQLiteMixin, ZeroStorageTestsMixin, TestCase):
    pass


class PostgresZeroStorageTests(PostgresMixin, ZeroStorageTestsMixin, TestCase):
    pass
