"""
The devices a message was sealed for, checked against the chat's devices.

A client seals each message once per device of every member of the chat
(its own other devices included) and names them in the send, beside the
opaque payload (``devices: [{cyphrId, deviceId}]``). When that list is not
the chat's devices now, the send is refused with 409 DEVICES_CHANGED,
``details: {missing, stale}`` (the devices it left out, and those it named
that are not there), and nothing is stored: the client fetches the device
lists again, checks them, and seals again. The sending device itself may be
named or not.

A send that names no devices is a client of the single-device API: it is
taken as before.
"""

from __future__ import annotations

from typing import Any

from cyphr.errors import CHAT_NOT_FOUND, DEVICES_CHANGED, Conflict, NotFound
from cyphr.handlers.auth import AuthUser
from cyphr.store.devices import DeviceStore

Sealed = frozenset[tuple[str, int]]  # (cyphrId, deviceId)


def _named(devices: Any) -> list[dict[str, Any]]:
    return [{"cyphrId": cyphr_id, "deviceId": device_id}
            for cyphr_id, device_id in sorted(devices)]


class RecipientDevices:
    def __init__(self, devices: DeviceStore) -> None:
        self._devices = devices

    async def check(self, user: AuthUser, sealed: Sealed, *, chat_id: str | None = None,
                    recipient_id: str | None = None) -> None:
        """Refuse (409 DEVICES_CHANGED) ``sealed`` unless it is the devices
        of the chat's members (of ``chat_id``, or of the direct chat with
        ``recipient_id``, which may not exist yet), the sending device
        aside. A chat the sender is not in is 404 CHAT_NOT_FOUND, as
        everywhere."""
        if chat_id is not None:
            current = await self._devices.of_chat_members(chat_id)
            if not any(cyphr_id == user.cyphr_id for cyphr_id, _ in current):
                raise NotFound("No such chat", code=CHAT_NOT_FOUND)
        else:
            assert recipient_id is not None
            current = await self._devices.of_identities(sorted({user.cyphr_id, recipient_id}))
        expected = set(current)
        sender = (user.cyphr_id, user.device_id)
        expected.discard(sender)
        missing = expected - sealed
        stale = sealed - expected - {sender}
        if missing or stale:
            raise Conflict("The chat's devices are not those the message was sealed for; "
                           "fetch their lists and seal it again", code=DEVICES_CHANGED,
                           details={"missing": _named(missing), "stale": _named(stale)})
