"""
Devices and linking, on the client (docs/encryption.rst, "Linking a
device", "Checking a device list"; cyphr.handlers.linking is the protocol).

Functions of a :class:`~cyphr.client.client.Client`; the Client's
``devices``, ``devices_of``, ``rename_device``, ``remove_device``,
``approve`` and ``link`` call them.

A device list is checked against the identity key the client pinned: a
device whose key is not signed by that key, for that device (version 3) or
as the identity's main key (version 2), comes back with ``verified``
False and ``problem`` saying why. Such a device is never to be sealed to:
:func:`usable_devices` leaves it out, and names it.

The link code a new device shows is ``cyphr-link:<provisioningId>:<link
fingerprint>``: the provisioning to approve, and the first 8 bytes (hex)
of SHA-256 of the new device's ephemeral key. The approving client checks
the key the server hands it against that fingerprint, and shows it too,
for the user to compare with the new device's screen (a code typed
without its fingerprint is checked by the user's eyes alone). The secret
that receives the sealed seed never leaves the new device.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey

from cyphr.client import crypto
from cyphr.client.crypto import CryptoError, KeyRefused, b64
from cyphr.client.devicecrypto import (
    EphemeralKey,
    LinkSeed,
    link_fingerprint,
    open_device_name,
    seal_device_name,
    seal_link_seed,
)
from cyphr.client.http import ApiError, ClientError, Http, check_server, segment
from cyphr.client.profile import Profile, check_passphrase
from cyphr.crypto import MLKEM1024_KEY_BYTES, is_mlkem1024_key

if TYPE_CHECKING:
    from cyphr.client.client import Client, Progress

_log = logging.getLogger(__name__)

LINK_CODE_PREFIX = "cyphr-link:"
POLL_SECONDS = 2.0  # how often a new device asks whether it was approved
_LINK_CODE = re.compile(r"^cyphr-link:([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
                        r"(?::([0-9a-f]{16}))?$")


@dataclass(frozen=True)
class Device:
    """One device of an identity as the server lists it, checked here.
    ``verified``: its key is signed by the pinned identity key for this
    device id (``key_version`` 3) or as the identity's main key (2), and is
    valid now; otherwise ``problem`` says why, and nothing is sealed to it.
    ``name`` (decrypted), ``last_seen`` and ``current`` only for one's own
    devices."""

    device_id: int
    verified: bool
    problem: str | None
    key_version: Any
    key_id: Any
    kyber_public_key: bytes | None
    created_at: str | None
    name: str | None = None
    last_seen: str | None = None
    current: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"deviceId": self.device_id, "verified": self.verified, "problem": self.problem,
                "keyVersion": self.key_version, "keyId": self.key_id,
                "createdAt": self.created_at, "name": self.name, "lastSeen": self.last_seen,
                "current": self.current}


@dataclass(frozen=True)
class LinkCode:
    """What a new device shows: the code (and its QR), and the fingerprint
    the approving screen must show too."""

    code: str
    provisioning_id: str
    fingerprint: str
    expires_at: str


@dataclass(frozen=True)
class LinkRequest:
    """A provisioning as the approving device sees it, before it approves:
    the key the server handed out for it, and that key's fingerprint to
    show the user."""

    provisioning_id: str
    ephemeral_key: bytes
    fingerprint: str
    expires_at: str


def link_code(provisioning_id: str, fingerprint: str) -> str:
    return f"{LINK_CODE_PREFIX}{provisioning_id}:{fingerprint}"


def parse_link_code(code: str) -> tuple[str, str | None]:
    """The provisioning id and the fingerprint (None when the code was given
    without it) of a link code; ClientError for anything else."""
    found = _LINK_CODE.match(code.strip().lower())
    if found is None:
        raise ClientError(f"not a link code (cyphr-link:<provisioning id>:<16 hex digits>, as "
                          f"`cyphr-client link` shows it): {code.strip()[:80]!r}")
    return found.group(1), found.group(2)


# -- checking a device list ------------------------------------------------------

def checked_device_key(identity_key: bytes, owner: str, entry: dict[str, Any], now: int) -> bytes:
    """The key of one listed device (or one a claim hands out in its place),
    checked against ``identity_key``; KeyRefused says why not."""
    device_id, version = entry.get("deviceId"), entry.get("kyberKeySignatureVersion")
    fields = dict(key_id=entry.get("kyberKeyId"), public_key=entry.get("kyberPublicKey"),
                  signature=entry.get("kyberKeySignature"),
                  created_at=entry.get("kyberKeyCreatedAt"),
                  expires_at=entry.get("kyberKeyExpiresAt"))
    if version == 2:
        # The identity's main key, as a single-device client signs it.
        return crypto.check_published_key(identity_key, owner, one_time=False,
                                          signature_version=2, now=now, **fields).public_key
    if version == 1:
        raise KeyRefused(f"{owner} has not upgraded to v2 key signatures")
    if version != 3:
        raise KeyRefused(f"its key has no device-key signature (version {version!r})")
    key_id = fields["key_id"]
    if not isinstance(key_id, int) or isinstance(key_id, bool) \
            or not 0 <= key_id <= crypto.MAX_KEY_ID:
        raise KeyRefused("its key has no valid key id")
    try:
        key = crypto.unb64(fields["public_key"], "its key", MLKEM1024_KEY_BYTES)
        signature = crypto.unb64(fields["signature"], "its key signature", 64)
    except CryptoError as e:
        raise KeyRefused(str(e)) from None
    created = crypto.parse_iso_ms(fields["created_at"], "its key's createdAt")
    expires = crypto.parse_iso_ms(fields["expires_at"], "its key's expiresAt")
    if not crypto.verify_device_key(identity_key, owner, device_id, key_id, created, expires,
                                    key, signature):
        raise KeyRefused(f"its key is not signed by {owner}'s identity key as the key of "
                         f"device {device_id}: a device the server added or altered")
    if expires <= now:
        raise KeyRefused(f"its key expired at {crypto.iso_ms(expires)}")
    if created > now + crypto.MAX_CLOCK_SKEW_MS:
        raise KeyRefused(f"its key claims to be made in the future ({crypto.iso_ms(created)})")
    if not is_mlkem1024_key(key):
        raise KeyRefused("its key is not a valid ML-KEM-1024 key")
    return key


def _check_list(client: Client, owner: str, identity_key: bytes,
                entries: Any) -> list[tuple[dict[str, Any], Device]]:
    if not isinstance(entries, list):
        raise ClientError(f"the server's device list of {owner} is not a list")
    checked = []
    now = client._now()
    for entry in entries:
        device_id = entry.get("deviceId") if isinstance(entry, dict) else None
        if not isinstance(device_id, int) or isinstance(device_id, bool) or device_id < 1:
            raise ClientError(f"the server's device list of {owner} holds an entry without a "
                              f"device id")
        try:
            key, problem = checked_device_key(identity_key, owner, entry, now), None
        except KeyRefused as e:
            key, problem = None, str(e)
            _log.warning("Device %s of %s is refused: %s", device_id, owner, problem)
        checked.append((entry, Device(device_id, problem is None, problem,
                                      entry.get("kyberKeySignatureVersion"),
                                      entry.get("kyberKeyId"), key, entry.get("createdAt"))))
    return checked


def devices_of(client: Client, cyphr_id: str) -> list[Device]:
    """Another user's devices (or one's own), each checked against the
    identity key pinned for ``cyphr_id`` (pinned now on first use; another
    key is IdentityChanged)."""
    answer = client._call("GET", f"/api/devices/{segment(cyphr_id)}")
    if answer.get("cyphrId") != cyphr_id:
        raise ClientError(f"the server answered the devices of {answer.get('cyphrId')!r} when "
                          f"asked for {cyphr_id}'s")
    identity_key = client._identity_key_in(answer, cyphr_id)
    if cyphr_id == client.cyphr_id:
        if identity_key != client.identity.public_key:
            raise ClientError(f"the server lists another identity key for {cyphr_id} than "
                              f"this profile's: refusing its device list")
    else:
        client._check_pin(cyphr_id, identity_key)
        client._pinned(cyphr_id, identity_key)
    return [device for _, device in _check_list(client, cyphr_id, identity_key,
                                                answer.get("devices"))]


def usable_devices(client: Client, cyphr_id: str) -> tuple[list[Device], list[Device]]:
    """The devices of ``cyphr_id`` that may be sealed to, and those refused."""
    devices = devices_of(client, cyphr_id)
    return [d for d in devices if d.verified], [d for d in devices if not d.verified]


def own_devices(client: Client) -> list[Device]:
    """This identity's devices, with their names decrypted (None when
    unnamed, or not readable: ``problem`` then says so if the key is fine)
    and their keys checked against this identity's own key."""
    answer = client._call("GET", "/api/devices/me")
    me = client.cyphr_id
    devices = []
    for entry, device in _check_list(client, me, client.identity.public_key,
                                     answer.get("devices")):
        name, problem = None, device.problem
        sealed = entry.get("encryptedName")
        if sealed:
            try:
                name = open_device_name(client.identity.seed, me, device.device_id,
                                        crypto.unb64(sealed, "encryptedName"))
            except CryptoError as e:
                problem = problem or str(e)
        devices.append(Device(device.device_id, device.verified, problem, device.key_version,
                              device.key_id, device.kyber_public_key, device.created_at, name,
                              entry.get("lastSeen"), entry.get("current") is True))
    return devices


def rename_device(client: Client, device_id: int, name: str | None) -> None:
    """Name one of this identity's devices (None or "" clears its name)."""
    body: dict[str, Any] = {"encryptedName": None}
    if name:
        body["encryptedName"] = b64(seal_device_name(client.identity.seed, client.cyphr_id,
                                                     device_id, name))
    client._call("PUT", f"/api/devices/me/{device_id}", body)


def remove_device(client: Client, device_id: int) -> None:
    """Remove one of this identity's devices: its session ends at once."""
    client._call("DELETE", f"/api/devices/me/{device_id}", {})


# -- approving a new device ---------------------------------------------------

def link_request(client: Client, code: str) -> LinkRequest:
    """The provisioning of ``code``, with the key the server hands out for
    it; ClientError when that key is not the one the code's fingerprint
    names (the server swapped it)."""
    provisioning_id, expected = parse_link_code(code)
    answer = client._call("GET", f"/api/devices/provision/{provisioning_id}")
    try:
        key = crypto.unb64(answer.get("ephemeralKey"), "the new device's key", 1600)
    except CryptoError as e:
        raise ClientError(str(e)) from None
    fingerprint = link_fingerprint(key)
    if expected is not None and fingerprint != expected:
        raise ClientError(f"the server gave another key for this link than the new device's "
                          f"(fingerprint {fingerprint}, the code says {expected}): refusing to "
                          f"approve it; nothing was sent")
    return LinkRequest(provisioning_id, key, fingerprint, str(answer.get("expiresAt", "")))


def approve(client: Client, request: LinkRequest) -> int:
    """Seal this identity's seed to the new device's key and approve it;
    answers the device id the server reserved for it."""
    with client.profile.lock:
        group_keys = {chat_id: base64.b64decode(key) for chat_id, key
                      in client.profile.vault.get("groupKeys", {}).items()}
    sealed = seal_link_seed(LinkSeed(client.identity.seed, client.identity.generation,
                                     group_keys),
                            request.ephemeral_key, request.provisioning_id, client.cyphr_id)
    answer = client._call("POST", f"/api/devices/provision/{request.provisioning_id}/approve",
                          {"sealed": b64(sealed)})
    return int(answer["deviceId"])


# -- the new device -----------------------------------------------------------

def _receive(http: Http, provisioning_id: str, secret: str, deadline: float, poll: float,
             sleep: Callable[[float], None], clock: Callable[[], float]) -> dict[str, Any]:
    """The receive answer once approved: polled every ``poll`` seconds,
    waiting as long as a 429 asks."""
    while True:
        wait = poll
        try:
            answer = http.call("POST", f"/api/devices/provision/{provisioning_id}/receive",
                               {"secret": secret}, auth=False)
        except ApiError as e:
            if e.code == "PROVISION_NOT_FOUND":
                raise ClientError("the link expired or was used before it was approved: run "
                                  "`cyphr-client link` again") from None
            if e.status != 429:
                raise
            wait = max(poll, e.retry_after or poll)
        else:
            if not answer.get("pending"):
                return answer
        if clock() + wait > deadline:
            raise ClientError("the link was not approved in time: run `cyphr-client link` "
                              "again")
        sleep(wait)


def _remove_profile(directory: Path) -> None:
    for name in ("vault.json", "profile.json", "vault.lock"):
        (directory / name).unlink(missing_ok=True)


def link(cls: type[Client], directory: str | Path, passphrase: str, server: str, *,
         on_code: Callable[[LinkCode], None], name: str | None = None,
         prekeys: int = 100, progress: Progress | None = None, poll: float | None = None,
         timeout: float = 600.0, sleep: Callable[[float], None] = time.sleep,
         **kwargs: Any) -> Client:
    """Join an identity as a new device, approved by one of its devices
    (see the module). ``on_code`` is given the code to show; then this
    waits (at most ``timeout`` s) for the approval, opens the seed, makes
    this device's own ML-KEM-1024 key, links, and publishes ``prekeys``
    one-time prekeys. A profile is made only once the seed is open, and is
    removed again if linking fails."""
    from cyphr.client.client import new_fingerprint

    directory = Path(directory).expanduser()
    if Profile.exists(directory):
        raise ClientError(f"{directory} already holds a profile")
    check_passphrase(passphrase)  # before the user waits, not after
    server = check_server(server, kwargs.get("verify_tls", True))
    clock: Callable[[], float] = kwargs.get("clock", time.time)
    ephemeral = EphemeralKey()
    http = Http(server, verify=kwargs.get("verify_tls", True))
    try:
        answer = http.call("POST", "/api/devices/provision", {"ephemeralKey": b64(ephemeral.public)},
                           auth=False)
        provisioning_id, secret = answer["provisioningId"], answer["secret"]
        on_code(LinkCode(link_code(provisioning_id, ephemeral.fingerprint), provisioning_id,
                         ephemeral.fingerprint, str(answer.get("expiresAt", ""))))
        # POLL_SECONDS read now, not when this module was loaded: a test of
        # the command (which passes none) may make it shorter.
        received = _receive(http, provisioning_id, secret, clock() + timeout,
                            POLL_SECONDS if poll is None else poll, sleep, clock)
    finally:
        http.close()
    cyphr_id, device_id = received.get("cyphrId"), received.get("deviceId")
    if not isinstance(cyphr_id, str) or not isinstance(device_id, int) or device_id < 1:
        raise ClientError("the server's answer names no Cyphr ID or device id")
    try:
        opened = ephemeral.open(crypto.unb64(received.get("sealed"), "the sealed seed"),
                                provisioning_id, cyphr_id)
    finally:
        ephemeral.erase()
    device_key = MLKEM1024PrivateKey.generate()
    vault = {"seed": b64(opened.seed), "generation": opened.generation,
             "fingerprint": new_fingerprint(), "prekeys": {}, "nextPrekeyId": 1, "pins": {},
             "contentKeys": {}, "groupKeys": {c: b64(k) for c, k in opened.group_keys.items()},
             # Secrets first: never a published key without its secret.
             "deviceKey": {"keyId": 0, "seed": b64(device_key.private_bytes_raw())}}
    profile = Profile.create(directory, passphrase, {"server": server}, vault)
    try:
        client = cls(profile, **kwargs)
        form = crypto.device_key_form(client.identity, cyphr_id, device_id, 0,
                                      device_key.public_key().public_bytes_raw(), client._now())
        answer = client.http.call("POST", "/api/devices/link", {
            "cyphrId": cyphr_id, "linkToken": received.get("linkToken"),
            "deviceFingerprint": vault["fingerprint"], **form}, auth=False)
        with client.profile.lock:
            user = answer.get("user") if isinstance(answer.get("user"), dict) else {}
            client.profile.settings.update(cyphrId=cyphr_id, userId=user.get("userId"),
                                           deviceId=answer.get("deviceId", device_id))
            client._save(deviceKey=dict(vault["deviceKey"], **_key_record(form)))
            client._set_session(answer)
    except BaseException:
        profile.close()
        _remove_profile(directory)
        raise
    # The seed must be the identity's: its key is the one the server lists
    # for the Cyphr ID, and this device is listed with the key made here.
    mine = {d.device_id: d for d in devices_of(client, cyphr_id)}
    if device_id not in mine or not mine[device_id].verified \
            or mine[device_id].kyber_public_key != device_key.public_key().public_bytes_raw():
        raise ClientError(f"the server does not list this device ({device_id}) with its key "
                          f"among {cyphr_id}'s devices")
    client._restore_pins()
    if name:
        rename_device(client, device_id, name)
    if prekeys:
        client.upload_prekeys(prekeys, progress)
    return client


# -- this device's own key ------------------------------------------------------

def _key_record(form: dict[str, Any]) -> dict[str, int]:
    return {"keyId": form["kyberKeyId"],
            "createdAt": crypto.parse_iso_ms(form["kyberKeyCreatedAt"], "createdAt"),
            "expiresAt": crypto.parse_iso_ms(form["kyberKeyExpiresAt"], "expiresAt")}


def has_device_key(client: Client) -> bool:
    """Whether this profile has a device key of its own (a linked device),
    rather than the main key the seed gives."""
    with client.profile.lock:
        return "deviceKey" in client.profile.vault


def publish_device_key(client: Client, rotate: bool = False) -> int:
    """Sign this device's key again for its device id (a new key with the
    next key id when ``rotate``) and publish it; answers its key id."""
    with client.profile.lock:
        record = dict(client.profile.vault["deviceKey"])
    if rotate:
        record = {"keyId": int(record["keyId"]) + 1,
                  "seed": b64(MLKEM1024PrivateKey.generate().private_bytes_raw())}
        client._save(pendingDeviceKey=record)  # the secret before the key is published
    public = MLKEM1024PrivateKey.from_seed_bytes(
        base64.b64decode(record["seed"])).public_key().public_bytes_raw()
    device_id = int(client.profile.settings["deviceId"])
    form = crypto.device_key_form(client.identity, client.cyphr_id, device_id,
                                  int(record["keyId"]), public, client._now())
    client._call("POST", "/api/messaging/store-public-key", form)
    with client.profile.lock:
        previous = client.profile.vault.get("deviceKey")
        if rotate and previous is not None:
            # Messages sealed to the old key still open.
            client.profile.vault.setdefault("oldDeviceKeys", []).append(previous)
        client.profile.vault.pop("pendingDeviceKey", None)
        client.profile.vault["deviceKey"] = dict(record, **_key_record(form))
        client.profile.save()
    return int(record["keyId"])


def renew_device_key(client: Client, force: bool = False) -> bool:
    """Sign the device key again when fewer than 150 days of it are left."""
    with client.profile.lock:
        record = client.profile.vault["deviceKey"]
    if not force and isinstance(record.get("expiresAt"), int) \
            and record["expiresAt"] - client._now() >= crypto.MAIN_KEY_RENEW_MS:
        return False
    publish_device_key(client)
    return True
