"""
A client without an account must not be able to make the server hold
memory, burn CPU or fill the log (issue 18, HIGH 2, MEDIUM 3 and 4). Over a
real port, speaking the protocol by hand (tests.test_realtime_transport's
plumbing): before a socket's token is accepted only packets of a few KiB
are read; after it, a whole event (header and every attachment) must fit
max_body; namespace names are short and never echoed at length; what
waits in the transport's write buffer counts toward realtime_buffer; and
ordinary refusals are counted in a metric, not logged one by one.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

import tests.test_realtime_transport as wire
from cyphr.errors import BadRequest
from cyphr.handlers.validation import MAX_ECHO, Fields
from cyphr.realtime.socketio import UNTRUSTED_LIMIT
from tests.helpers import SQLiteMixin
from tests.realtime import sleep, until

SMALL = wire.SMALL
POLLING = wire.POLLING
WEBSOCKET = wire.WEBSOCKET
compact = wire.compact


def _placeholders(count: int) -> str:
    return ",".join(compact({"_placeholder": True, "num": n}) for n in range(count))


class HostileTests(SQLiteMixin, TestCase):
    """Attacks of a client without an account, and the limits after sign-in."""

    timeout = 30

    # The wire plumbing of the transport tests (their functions, not their tests).
    serve = wire.TransportTests.serve
    _hang_up = wire.TransportTests._hang_up
    request = wire.TransportTests.request
    user = wire.TransportTests.user
    handshake = wire.TransportTests.handshake
    poll = wire.TransportTests.poll
    post = wire.TransportTests.post
    polling_socket = wire.TransportTests.polling_socket
    connect_ws = wire.TransportTests.connect_ws
    websocket = wire.TransportTests.websocket
    _open = wire.TransportTests._open
    assert_alive = wire.TransportTests.assert_alive
    gone = wire.TransportTests.gone
    signed_in_ws = wire.TransportTests.signed_in_ws

    async def refused(self) -> dict[str, int]:
        """cyphr_realtime_refused_total by reason, scraped from /metrics."""
        text = (await self.request("GET", "", path="/metrics")).body.decode("utf-8")
        return {match[1]: int(float(match[2])) for match in re.finditer(
            r'^cyphr_realtime_refused_total\{reason="([a-z_]+)"\} (\S+)$', text, re.M)}

    # -- before the token is accepted: only a few KiB --------------------------

    async def test_untrusted_attachments_refused_from_the_frame_header(self) -> None:
        """A socket connected without a token that announces 10 attachments
        and sends one bigger than the untrusted limit is closed (1009) as
        that frame's header arrives: nothing of it is buffered, and the
        refusal is counted as too_large."""
        await self.serve()
        ws, sid, _ = await self.websocket()
        ws.send_text(f'4510-["x",{_placeholders(10)}]')
        ws.send_binary(b"\x00" * (10 * 1024 * 1024))
        code, _ = await ws.wait_closed()
        self.assertEqual(code, 1009)
        self.assertTrue(self.gone(sid))
        self.assertGreaterEqual((await self.refused()).get("too_large", 0), 1)

    async def test_untrusted_event_and_attachments_share_the_limit(self) -> None:
        """Before sign-in the whole event, header and attachments together,
        must fit the untrusted limit: attachments each under it but over it
        together close the session."""
        await self.serve()
        ws, sid, _ = await self.websocket()
        ws.send_text(f'453-["x",{_placeholders(3)}]')
        part = b"\x01" * (UNTRUSTED_LIMIT // 2)
        ws.send_binary(part)
        ws.send_binary(part)
        code, _ = await ws.wait_closed()
        self.assertEqual(code, 1009)
        self.assertTrue(self.gone(sid))

    async def test_untrusted_json_frame_not_parsed(self) -> None:
        """A 10 MiB JSON frame before any CONNECT closes the session (1009)
        unread, as does one of a few KiB too many after a CONNECT without a
        token; a frame within the limit is read."""
        await self.serve()
        ws, sid, _ = await self.websocket(connect=False)
        ws.send_text('42["x","' + "y" * (10 * 1024 * 1024) + '"]')
        self.assertEqual((await ws.wait_closed())[0], 1009)
        self.assertTrue(self.gone(sid))
        ws, sid, _ = await self.websocket()
        head = '421["no_such_event","'
        ws.send_text(head + "y" * (UNTRUSTED_LIMIT - len(head) - 2) + '"]')
        self.assertEqual(await ws.recv(), f"431[{wire.UNKNOWN_EVENT}]")
        ws.send_text(head + "y" * (UNTRUSTED_LIMIT - len(head) - 1) + '"]')
        self.assertEqual((await ws.wait_closed())[0], 1009)
        self.assertTrue(self.gone(sid))

    async def test_untrusted_polling_body_refused_unread(self) -> None:
        """Over polling, a body past the untrusted limit (a 10 MiB frame
        before CONNECT, or after a CONNECT without a token) is answered 413
        before it is decoded, and the session ends."""
        await self.serve()
        sid, _ = await self.handshake()
        reply = await self.post(sid, '42["x","' + "y" * (10 * 1024 * 1024) + '"]')
        self.assertEqual(reply.code, 413)
        self.assertTrue(self.gone(sid))
        sid, _ = await self.polling_socket()
        reply = await self.post(sid, '451-["x",{"_placeholder":true,"num":0}]\x1eb'
                                + "A" * (4 * UNTRUSTED_LIMIT))
        self.assertEqual(reply.code, 413)
        self.assertTrue(self.gone(sid))

    async def test_upgrade_probe_held_to_the_session_limit(self) -> None:
        """A WebSocket upgrading an untrusted polling session is held to the
        same limit: a large frame on the probe closes the probe (1009) and
        the polling session goes on."""
        await self.serve()
        sid, _ = await self.polling_socket()
        ws = await self.connect_ws(sid)
        ws.send_binary(b"\x00" * (UNTRUSTED_LIMIT + 1))
        self.assertEqual((await ws.wait_closed())[0], 1009)
        self.assertFalse(self.gone(sid))
        self.assertEqual((await self.post(sid, '428["no_such_event"]')).body, b"ok")
        self.assertEqual((await self.poll(sid)).body, f"438[{wire.UNKNOWN_EVENT}]".encode())

    # -- namespaces --------------------------------------------------------------

    async def test_long_namespace_closes_without_echo(self) -> None:
        """A CONNECT to a namespace name over 128 characters is a protocol
        error (4003) and nothing of it is sent back; a name of 128 is
        answered with the usual CONNECT_ERROR."""
        await self.serve()
        ws, _, _ = await self.websocket(connect=False)
        name = "/" + "n" * 127
        ws.send_text(f"40{name},")
        self.assertEqual(await ws.recv(), f'44{name},{{"message":"Invalid namespace"}}')
        ws.send_text("40/" + "n" * 128 + ",")
        self.assertEqual(await ws.wait_closed(), (4003, "protocol error"))
        self.assertEqual(ws.frames.pending, [])
        ws, sid, _ = await self.websocket(connect=False)
        ws.send_text("40/" + "n" * (UNTRUSTED_LIMIT - 10))
        self.assertEqual(await ws.wait_closed(), (4003, "protocol error"))
        self.assertEqual(ws.frames.pending, [])

    # -- after sign-in: the event limit ----------------------------------------------

    async def test_signed_in_frame_up_to_max_body(self) -> None:
        """Once its token is accepted, a socket may send a frame of max_body;
        one byte more closes it (1009)."""
        await self.serve(max_body=SMALL, realtime_buffer=SMALL)
        ws, sid, _ = await self.signed_in_ws()
        head = '42["no_such_event","'
        ws.send_text(head + "x" * (SMALL - len(head) - 2) + '"]')
        await self.assert_alive(ws)
        ws.send_text(head + "x" * (SMALL - len(head) - 1) + '"]')
        self.assertEqual((await ws.wait_closed())[0], 1009)
        await until(lambda: self.gone(sid), "the session to end")

    async def test_signed_in_event_limit_counts_every_attachment(self) -> None:
        """After sign-in, attachments each under max_body but together over
        it close the session when the one that passes arrives; an event
        whose attachments fit is delivered."""
        await self.serve(max_body=SMALL, realtime_buffer=SMALL)
        ws, sid, _ = await self.signed_in_ws()
        third = b"\x02" * (SMALL // 3 - 200)
        ws.send_text(f'453-1["no_such_event",{_placeholders(3)}]')
        for _ in range(3):
            ws.send_binary(third)
        self.assertEqual(await ws.recv(), f"431[{wire.UNKNOWN_EVENT}]")
        half = b"\x02" * (SMALL // 2)
        ws.send_text(f'453-2["no_such_event",{_placeholders(3)}]')
        ws.send_binary(half)
        ws.send_binary(half)
        self.assertEqual((await ws.wait_closed())[0], 1009)
        await until(lambda: self.gone(sid), "the session to end")

    async def test_signed_in_polling_event_limit(self) -> None:
        """The same over polling: attachments posted one by one, together
        over max_body, end the session with 413."""
        await self.serve(max_body=SMALL, realtime_buffer=SMALL)
        alice = await self.user()
        sid, _ = await self.polling_socket(alice)
        b64 = "A" * (4 * 8192)  # 24 KiB: three of them pass max_body
        self.assertEqual((await self.post(sid, f'453-["x",{_placeholders(3)}]\x1eb{b64}')).body, b"ok")
        self.assertEqual((await self.post(sid, "b" + b64)).body, b"ok")
        reply = await self.post(sid, "b" + b64)
        self.assertEqual(reply.code, 413)
        self.assertTrue(self.gone(sid))

    # -- the slow consumer -------------------------------------------------------------

    async def test_transport_buffer_counts_as_unsent(self) -> None:
        """What waits in the WebSocket transport's own write buffer counts
        toward realtime_buffer: a client that never reads is closed as a
        slow consumer once that and the session's queue together pass it."""
        await self.serve(max_body=SMALL, realtime_buffer=SMALL)
        # Small kernel buffers at both ends: the server's writes back up at once.
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", self.port))
        raw.setblocking(False)
        factory = wire._RecordingFactory(f"ws://127.0.0.1:{self.port}/socket.io/?{WEBSOCKET}")
        from twisted.internet import reactor
        reactor.adoptStreamConnection(raw.fileno(), socket.AF_INET, factory)
        raw.close()
        [ws] = factory.built
        self.websockets.append(ws)
        await ws.opened.addTimeout(5, reactor)
        sid, socket_sid = await self._open(ws, connect=True)
        session = self.server.engine.sessions[sid]
        session._ws.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ws.transport.pauseProducing()  # stop reading
        sio = self.server.realtime.ns.sockets[socket_sid]
        chunk = "x" * (SMALL - 4096)
        for _ in range(3):
            sio.emit("bulk", chunk)
            await sleep(0.05)  # the reactor writes what the kernel takes
        self.assertTrue(self.gone(sid), "the transport's buffer was not counted")
        ws.transport.resumeProducing()
        self.assertEqual(await ws.wait_closed(10), (4002, "slow consumer"))

    # -- refusals: a metric, not the log -----------------------------------------------

    async def test_refusals_counted_not_logged(self) -> None:
        """Refused events (unknown, signed-out, bad arguments, too deep, over
        the rate), with or without an ack id, log no error and no traceback:
        they are counted by reason in cyphr_realtime_refused_total, with at
        most one summary line per minute."""
        await self.serve(realtime_event_rate=(20, 1))
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        ws, _, _ = await self.websocket()
        for frame in ['42["no_such_event"]', '42["send_message",{}]', '42["authenticate",1,2,3]',
                      "42" + compact(["send_message", [[[[]]]]]).replace("[[[[]]]]", "[" * 70 + "]" * 70)]:
            for ack in ("", "7"):
                ws.send_text(frame[:2] + ack + frame[2:])
        for _ in range(30):
            ws.send_text('42["no_such_event"]')
        ws.send_text('4298["no_such_event"]')
        while not (await ws.recv()).startswith("4398["):
            pass  # the acks of the refusals that asked for one
        self.clock.advance(1)
        await self.assert_alive(ws)
        counts = await self.refused()
        for reason in ("unknown_event", "refused", "bad_arguments", "too_deep", "rate"):
            self.assertGreater(counts.get(reason, 0), 0, (reason, counts))
        errors = [e for e in logged if e.get("log_failure") is not None
                  or e.get("log_level") is not None and e["log_level"].name in ("error", "critical")]
        self.assertEqual(errors, [])
        summaries = [e for e in logged if "Refused" in e.get("log_format", "")]
        self.assertEqual(len(summaries), 1, [e.get("log_format") for e in summaries])
        self.clock.advance(60)  # (the signed-out socket is ended meanwhile)
        ws, _, _ = await self.websocket()
        ws.send_text('42["no_such_event"]')
        await self.assert_alive(ws, 97)
        summaries = [e for e in logged if "Refused" in e.get("log_format", "")]
        self.assertEqual(len(summaries), 2)

    async def test_rate_checked_before_parsing(self) -> None:
        """Past the event rate an event is refused from its header: its JSON
        is not parsed (a broken payload is answered RATE_LIMITED, where
        within the rate it would close the session)."""
        await self.serve(realtime_event_rate=(2, 2))
        ws, sid, _ = await self.websocket()
        for n in range(2):
            ws.send_text(f'42{n}["no_such_event"]')
            self.assertEqual(await ws.recv(), f"43{n}[{wire.UNKNOWN_EVENT}]")
        ws.send_text('425["no_such_event",}')
        self.assertEqual(await ws.recv(), f"435[{wire.RATE_LIMITED}]")
        self.assertFalse(self.gone(sid))


class EchoTests(SynchronousTestCase):
    """Field names a client makes up are repeated only in part."""

    def test_unknown_field_names_capped(self) -> None:
        """An unknown field name of 1 MiB is named in the error with at most
        MAX_ECHO characters, and at most ten unknown names are listed."""
        body = {"k" * (1024 * 1024): 1, **{f"f{n}": n for n in range(30)}}
        with self.assertRaises(BadRequest) as caught:
            Fields(body, ["chatId"])
        error = caught.exception
        self.assertLess(len(error.message), 1000)
        self.assertIn("and 21 more", error.message)
        fields = error.details["fields"]
        self.assertEqual(len(fields), 10)
        self.assertTrue(all(len(name) <= MAX_ECHO for name in fields))

    def test_known_shape_unchanged(self) -> None:
        """A short unknown field is named as before."""
        with self.assertRaises(BadRequest) as caught:
            Fields({"b": 1, "a": 2}, [])
        self.assertEqual(caught.exception.message, "Unknown field: a, b")
        self.assertEqual(caught.exception.details, {"fields": ["a", "b"]})
