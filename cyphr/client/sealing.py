"""
Sealing a message for every device of its chat's members (docs/encryption.rst,
"Sealing per device"): functions of a :class:`~cyphr.client.client.Client`,
whose ``sealed`` and ``send_sealed`` call them.

For every message, each member's device list is fetched and checked
against the pinned identity key (:func:`cyphr.client.devices.usable_devices`);
each device that verifies gets a one-time prekey claimed for it (or its own
key); the sending device is sealed to with its own key. A device refused is
never sealed to, and is named in :attr:`Client.refused_devices` and in a
warning. No list is kept between messages (each is checked against the pin
every time), so a send refused DEVICES_CHANGED is sealed again from fresh
lists, once.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey

from cyphr.client import devices
from cyphr.client.crypto import DeviceRecipient, KeyRefused, PublishedKey
from cyphr.client.devices import Device
from cyphr.client.http import ApiError, ClientError, segment

if TYPE_CHECKING:
    from cyphr.client.client import Client

_log = logging.getLogger(__name__)

CLAIM_PAUSE = 600.0  # s: after a device had no prekey left, its own key this long


def device_keys(client: Client) -> dict[int, bytes] | None:
    """A linked device's own ML-KEM keys (key id to seed), the current and
    the rotated ones; None on a device that uses the identity's main key."""
    with client.profile.lock:
        vault = client.profile.vault
        if "deviceKey" not in vault:
            return None
        records = [vault["deviceKey"], *vault.get("oldDeviceKeys", [])]
    return {int(r["keyId"]): base64.b64decode(r["seed"]) for r in records}


def own_recipient(client: Client) -> DeviceRecipient:
    """The sending device itself (its own history): its own key, never a
    prekey of its own."""
    keys = device_keys(client)
    if keys is None:
        return DeviceRecipient(client.cyphr_id, client.device_id, client.identity.public_key,
                               client.identity.kyber_public_key, client.identity.generation)
    with client.profile.lock:
        key_id = int(client.profile.vault["deviceKey"]["keyId"])
    public = MLKEM1024PrivateKey.from_seed_bytes(keys[key_id]).public_key()
    return DeviceRecipient(client.cyphr_id, client.device_id, client.identity.public_key,
                           public.public_bytes_raw(), key_id)


def _claimed_device_key(client: Client, cyphr_id: str, identity_key: bytes, device_id: int,
                        claim: dict[str, Any]) -> DeviceRecipient:
    """A device's own key as a claim hands it out (it had no prekey
    left), checked as a device list's entries are."""
    entry = {"deviceId": device_id, "kyberKeySignatureVersion": claim.get("signatureVersion"),
             "kyberKeyId": claim.get("keyId"), "kyberPublicKey": claim.get("kyberPublicKey"),
             "kyberKeySignature": claim.get("signature"),
             "kyberKeyCreatedAt": claim.get("createdAt"),
             "kyberKeyExpiresAt": claim.get("expiresAt")}
    try:
        key = devices.checked_device_key(identity_key, cyphr_id, entry, client._now())
    except KeyRefused as e:
        raise ClientError(f"the key handed out for device {device_id} of {cyphr_id}: {e}: "
                          f"refusing it") from None
    if claim.get("signatureVersion") == 2:
        # The identity's main key: ids never go back (as contact() checks).
        client._pinned(cyphr_id, identity_key, PublishedKey(
            cyphr_id, False, claim["keyId"], key, 0, 0))
    return DeviceRecipient(cyphr_id, device_id, identity_key, key, claim["keyId"])


def device_recipient(client: Client, cyphr_id: str, identity_key: bytes,
                     device: Device) -> DeviceRecipient:
    """One device to seal to: one of its one-time prekeys, claimed and
    checked, else its own key (as the claim or, paused, its list gives it)."""
    if cyphr_id == client.cyphr_id and device.device_id == client.device_id:
        return own_recipient(client)
    paused = (cyphr_id, device.device_id)
    if client._claim_paused.get(paused, 0.0) <= time.monotonic():
        try:
            claim = client._call("POST", f"/api/keys/claim/{segment(cyphr_id)}/"
                                         f"{device.device_id}", {})
        except ApiError as e:
            if e.code != "RATE_LIMITED":
                raise
            client._claim_paused[paused] = time.monotonic() + (e.retry_after or 60.0)
        else:
            if claim.get("deviceId", device.device_id) != device.device_id:
                raise ClientError(f"the server answered a key of device "
                                  f"{claim.get('deviceId')!r} when asked for device "
                                  f"{device.device_id} of {cyphr_id}: refusing it")
            if claim.get("oneTime") is False:
                recipient = _claimed_device_key(client, cyphr_id, identity_key,
                                                device.device_id, claim)
                # Paused once the key checked: a lying claim pauses nothing.
                client._claim_paused[paused] = time.monotonic() + CLAIM_PAUSE
                return recipient
            # The server hands the key out; only the identity key vouches
            # for it, its kind, its owner, its id and its validity.
            key = client._checked_key(
                cyphr_id, identity_key, one_time=claim.get("oneTime"),
                key_id=claim.get("keyId"), public_key=claim.get("kyberPublicKey"),
                signature=claim.get("signature"), created_at=claim.get("createdAt"),
                expires_at=claim.get("expiresAt"),
                signature_version=claim.get("signatureVersion"))
            client._use_prekey(cyphr_id, key)
            return DeviceRecipient(cyphr_id, device.device_id, identity_key, key.public_key,
                                   key.key_id, True)
    assert device.kyber_public_key is not None and isinstance(device.key_id, int)
    return DeviceRecipient(cyphr_id, device.device_id, identity_key, device.kyber_public_key,
                           device.key_id)


def seal_devices(client: Client, members: list[str]
                 ) -> tuple[list[DeviceRecipient], list[dict[str, Any]]]:
    """Every device of every member to seal to (this identity's other
    devices and this device included), and the ``devices`` a send names:
    those sealed to but this one, and the refused ones (the server lists
    them: nothing in the payload is for them). Sets
    ``client.refused_devices``; a member none of whose devices may be
    sealed to is a ClientError."""
    recipients: list[DeviceRecipient] = []
    named: list[dict[str, Any]] = []
    refused: list[tuple[str, int, str]] = []
    me, mine = client.cyphr_id, client.device_id
    for cyphr_id in sorted(set(members)):
        # Fetched for every message, as contact() was: each time checked
        # against the pin, so that a changed identity key stops the send.
        usable, bad = devices.usable_devices(client, cyphr_id)
        identity_key = client._sender_key(cyphr_id)  # pinned by the device list's check
        for device in bad:
            refused.append((cyphr_id, device.device_id, device.problem or "refused"))
            named.append({"cyphrId": cyphr_id, "deviceId": device.device_id})
        if cyphr_id == me and all(d.device_id != mine for d in usable):
            usable = [*usable, Device(mine, True, None, None, None, None, None)]
        if not usable:
            raise ClientError(f"none of {cyphr_id}'s devices may be sealed to: " + "; ".join(
                f"device {d.device_id}: {d.problem}" for d in bad))
        for device in usable:
            recipients.append(device_recipient(client, cyphr_id, identity_key, device))
            if (cyphr_id, device.device_id) != (me, mine):
                named.append({"cyphrId": cyphr_id, "deviceId": device.device_id})
    for cyphr_id, device_id, problem in refused:
        _log.warning("Not sealing to device %s of %s: %s", device_id, cyphr_id, problem)
    client.refused_devices = refused
    named.sort(key=lambda d: (d["cyphrId"], d["deviceId"]))
    return recipients, named


def send_sealed(client: Client, to: str, plaintext: bytes, message_type: str,
                transmit: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Seal for ``to`` and ``transmit`` the send's body (REST or
    realtime); answers what it answers. Refused DEVICES_CHANGED (a device
    was added or removed since the lists were fetched), the message is
    sealed again from lists fetched and checked again, and sent once more;
    refused so again, it is a ClientError naming the devices."""
    # No list is kept between messages: sealing fetches them all.
    return sealed_again_once(lambda: transmit(client.sealed(to, plaintext, message_type)))


def sealed_again_once(seal_and_send: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``seal_and_send()`` (seal from device lists fetched now, and send);
    refused DEVICES_CHANGED, once more; refused so again, a ClientError
    naming the devices."""
    for attempt in (1, 2):
        try:
            return seal_and_send()
        except ApiError as e:
            if e.code != "DEVICES_CHANGED":
                raise
            if attempt == 2:
                raise ClientError(f"the chat's devices changed again while the message was "
                                  f"sealed again for them ({changed_text(e.details)}): not "
                                  f"sent; try again") from None
            _log.info("The devices of the chat changed (%s): sealing the message again",
                      changed_text(e.details))
    raise AssertionError("unreachable")


def changed_text(details: Any) -> str:
    """What a DEVICES_CHANGED answer's details name, for an error text."""
    if not isinstance(details, dict):
        return "the server named none"
    parts = []
    for name in ("missing", "stale"):
        entries = [d for d in details.get(name) or [] if isinstance(d, dict)]
        if entries:
            parts.append(f"{name}: " + ", ".join(f"{d.get('cyphrId')} {d.get('deviceId')}"
                                                 for d in entries))
    return "; ".join(parts) or "the server named none"
