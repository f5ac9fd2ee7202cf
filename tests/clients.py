"""
A server on a real port and reference clients of it (cyphr.client, driven
in threads off the reactor): the setting of the client tests.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.threads import deferToThread

from cyphr.client.client import Client
from tests.helpers import start_server

PASSPHRASE = "seventeen purple lanterns juggle over quiet harbours"


class ServedClients:
    """Mixed into a TestCase with SQLiteMixin or PostgresMixin."""

    async def setUp(self) -> None:
        self.server = await start_server(self, serve=True)
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.clients: list[Client] = []

    def tearDown(self) -> None:
        for client in self.clients:
            client.close()

    async def thread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await deferToThread(function, *args, **kwargs)

    async def linked(self, first: Client) -> Client:
        """A new device of ``first``'s identity, approved by ``first``."""
        from tests.test_client_devices import Linking

        linking = Linking(os.path.abspath(self.mktemp()), self.url)
        code = await linking.code()
        await self.thread(first.approve, code.code)
        device = await linking.done
        self.clients.append(device)
        return device

    async def registered(self, cyphr_id: str, prekeys: int = 2) -> Client:
        """A new profile (its directory: ``client.profile.directory``),
        registered as ``cyphr_id`` with ``prekeys`` one-time prekeys."""
        client, _ = await self.thread(Client.init, os.path.abspath(self.mktemp()), PASSPHRASE,
                                      self.url)
        self.clients.append(client)
        await self.thread(client.register, cyphr_id, None, prekeys)
        return client
