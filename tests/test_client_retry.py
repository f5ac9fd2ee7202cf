"""
The client's retry of a request whose connection dropped (cyphr.client.http):
a GET that lost its answer is sent again, once, on a new connection; a POST
is not (the server may have done it), and the caller is told. A real
socket server that closes its first connection without answering.
"""

from __future__ import annotations

import socket
import threading

from twisted.trial.unittest import SynchronousTestCase

from cyphr.client.http import ClientError, Http

ANSWER = b'{"success": true}'


class DroppingServer:
    """Closes the first connection once the request is read, without an
    answer; answers every later one. Counts the requests it read."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += connection.recv(65536)
                self.requests += 1
                if self.requests == 1:
                    continue  # closed unanswered
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                   % (len(ANSWER), ANSWER))

    def close(self) -> None:
        self.listener.close()


class RetryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = DroppingServer()
        self.addCleanup(self.server.close)
        self.http = Http(f"http://127.0.0.1:{self.server.port}", timeout=5)
        self.addCleanup(self.http.close)

    def test_a_get_is_sent_again(self) -> None:
        self.assertEqual(self.http.call("GET", "/api/health", auth=False), {"success": True})
        self.assertEqual(self.server.requests, 2)

    def test_a_post_is_not(self) -> None:
        with self.assertRaises(ClientError) as caught:
            self.http.call("POST", "/api/messaging/send", {"x": 1}, auth=False)
        self.assertIn("cannot reach", str(caught.exception))
        self.assertEqual(self.server.requests, 1)
