"""
Session keys on the client (docs/encryption.rst, "Sessions";
cyphr.client.sessions is the protocol, cyphr.handlers.sessionkeys the
server's directory). Functions of a :class:`~cyphr.client.client.Client`;
its ``publish_session_keys``, ``session_bundles``, ``session_secrets`` and
``erase_one_time_session_prekeys`` call them.

The vault keeps every private key this device has published, under
``sessionKeys``: the current signed X25519 prekey and last-resort ML-KEM
seed and the one before each (a handshake made from the old bundle may
still be on its way), and every one-time prekey not yet used. A secret is
saved before its public key is published, so that the server never hands
out a key this device cannot use.
"""

from __future__ import annotations

import base64
import os
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cyphr.client import sessions
from cyphr.client.crypto import b64, iso_ms, parse_iso_ms
from cyphr.client.http import ClientError, segment
from cyphr.client.sessions import Bundle, Handshake, Me, Party, Prekey, PrekeySecrets, SessionError

if TYPE_CHECKING:
    from cyphr.client.client import Client

DAY_MS = 86_400_000
SIGNED_PREKEY_ROTATE_MS = 7 * DAY_MS     # a new signed prekey this often ...
SIGNED_PREKEY_LIFETIME_MS = 30 * DAY_MS  # ... each valid this long
LAST_RESORT_ROTATE_MS = 30 * DAY_MS
LAST_RESORT_LIFETIME_MS = 90 * DAY_MS
ONE_TIME_LIFETIME_MS = 90 * DAY_MS
ONE_TIME_TARGET = 100                    # one-time prekeys of each kind kept published
ONE_TIME_LOW = 20                        # topped up below this
_SLOTS = {sessions.DH_SIGNED: "signed", sessions.KEM_LAST_RESORT: "lastResort",
          sessions.DH_ONE_TIME: "oneTime", sessions.KEM_ONE_TIME: "kemOneTime"}


def _vault(client: Client) -> dict[str, Any]:
    """The vault's ``sessionKeys`` (the caller holds the profile's lock)."""
    return client.profile.vault.setdefault("sessionKeys", {
        "signed": {}, "lastResort": {}, "oneTime": {}, "kemOneTime": {}, "nextKeyId": 1})


def me(client: Client) -> Me:
    """This device as its sessions know it."""
    private = sessions.identity_dh_private(client.identity.seed)
    public = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    owner = client.cyphr_id
    return Me(Party(owner, client.device_id, client.identity.public_key, public), private,
              sessions.sign_identity_dh(client.identity.signing_key, owner, public))


def _new_prekey(client: Client, kind: int, key_id: int, now: int,
                lifetime: int) -> tuple[dict[str, Any], bytes]:
    """(the upload form, the private key or seed)."""
    if kind in (sessions.DH_SIGNED, sessions.DH_ONE_TIME):
        private = os.urandom(32)
        public = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    else:
        private = os.urandom(64)
        public = MLKEM1024PrivateKey.from_seed_bytes(private).public_key().public_bytes_raw()
    created = now - 60_000  # a server clock a little behind does not refuse it
    prekey = Prekey(kind, client.cyphr_id, client.device_id, key_id, created, created + lifetime,
                    public).signed(client.identity.signing_key)
    return ({"keyId": key_id, "publicKey": b64(public), "signature": b64(prekey.signature),
             "createdAt": iso_ms(created), "expiresAt": iso_ms(created + lifetime)}, private)


def publish(client: Client, *, force_one_time: bool = False,
            one_time: int | None = None) -> dict[str, Any]:
    """Bring this device's published session keys up to date: the
    identity's X25519 key once, a new signed prekey every 7 days and a new
    last-resort ML-KEM key every 30, and one-time prekeys of each kind back
    to 100 (or ``one_time``) when fewer than 20 are left (or ``force_one_time``, after a
    session_prekeys_low). Answers the server's stock; uploads nothing when
    nothing is due."""
    one_time = ONE_TIME_TARGET if one_time is None else one_time
    stock = client._call("GET", "/api/sessions/keys")
    now = client._now()
    body: dict[str, Any] = {}
    if not stock["identityDh"]:
        mine = me(client)
        body["identityDh"] = {"publicKey": b64(mine.party.identity_dh),
                              "signature": b64(mine.identity_dh_signature)}

    def due(current: dict[str, Any] | None, rotate: int) -> bool:
        return current is None or now - parse_iso_ms(current["createdAt"], "createdAt") >= rotate

    wanted: list[tuple[str, int, int, int]] = []  # (field, kind, how many, lifetime)
    if due(stock["signedPrekey"], SIGNED_PREKEY_ROTATE_MS):
        wanted.append(("signedPrekey", sessions.DH_SIGNED, 1, SIGNED_PREKEY_LIFETIME_MS))
    if due(stock["lastResortPrekey"], LAST_RESORT_ROTATE_MS):
        wanted.append(("lastResortPrekey", sessions.KEM_LAST_RESORT, 1, LAST_RESORT_LIFETIME_MS))
    for field, kind in (("oneTimePrekeys", sessions.DH_ONE_TIME),
                        ("kemOneTimePrekeys", sessions.KEM_ONE_TIME)):
        if (stock[field] < ONE_TIME_LOW or force_one_time) and stock[field] < one_time:
            wanted.append((field, kind, one_time - stock[field], ONE_TIME_LIFETIME_MS))
    if not body and not wanted:
        return stock
    with client.profile.lock:
        vault = _vault(client)
        key_id = int(vault["nextKeyId"])
        for field, kind, count, lifetime in wanted:
            slot = vault[_SLOTS[kind]]
            made = []
            for _ in range(count):
                form, private = _new_prekey(client, kind, key_id, now, lifetime)
                made.append(form)
                slot[str(key_id)] = b64(private)
                key_id += 1
            if kind in (sessions.DH_SIGNED, sessions.KEM_LAST_RESORT):
                # The new one and the one before it (a handshake made from
                # the bundle that carried it may still be on its way).
                for old in sorted(slot, key=int)[:-2]:
                    del slot[old]
                body[field] = made[0]
            else:
                body[field] = made
        vault["nextKeyId"] = key_id
        client.profile.save()  # secrets first: never a published key without its secret
    return client._call("PUT", "/api/sessions/keys", body)


def bundles(client: Client, cyphr_id: str, device_id: int | None = None
            ) -> tuple[list[Bundle], list[tuple[int, str]]]:
    """The bundles of ``cyphr_id``'s devices (or of one), each checked
    against the identity key pinned for that user (pinned now on first
    use): (the good ones, [(device id, why refused)] for the others). A
    bundle any part of which the pinned key did not sign is never used."""
    # Checked and pinned first: a contact whose identity key changed costs
    # none of its one-time prekeys.
    identity_key = client.contact(cyphr_id).identity_key
    path = f"/api/sessions/bundles/{segment(cyphr_id)}"
    if device_id is not None:
        path += f"/{device_id}"
    answer = client._call("POST", path, {})
    if answer.get("identityKey") != b64(identity_key):
        raise ClientError(f"the server answered another identity key for {cyphr_id} than the "
                          f"one pinned")
    dh = answer.get("identityDh")
    good: list[Bundle] = []
    refused: list[tuple[int, str]] = []
    for entry in answer.get("bundles", []):
        try:
            bundle = _bundle(cyphr_id, dh, entry)
            sessions.check_bundle(bundle, identity_key, client._now())
        except (SessionError, KeyError, TypeError, ValueError) as e:
            refused.append((entry.get("deviceId") if isinstance(entry, dict) else None, str(e)))
            continue
        good.append(bundle)
    return good, refused


def _bundle(owner: str, dh: dict[str, Any], entry: dict[str, Any]) -> Bundle:
    device_id = entry["deviceId"]

    def prekey(value: dict[str, Any] | None) -> Prekey | None:
        if value is None:
            return None
        return Prekey(value["kind"], owner, device_id, value["keyId"],
                      parse_iso_ms(value["createdAt"], "createdAt"),
                      parse_iso_ms(value["expiresAt"], "expiresAt"),
                      base64.b64decode(value["publicKey"], validate=True),
                      base64.b64decode(value["signature"], validate=True))

    signed, kem = prekey(entry["signedPrekey"]), prekey(entry["kemPrekey"])
    if signed is None or kem is None:
        raise SessionError(f"the bundle of {owner}'s device {device_id} lacks a prekey")
    return Bundle(owner, device_id, base64.b64decode(dh["publicKey"], validate=True),
                  base64.b64decode(dh["signature"], validate=True), signed, kem,
                  prekey(entry.get("oneTimePrekey")))


def secrets(client: Client, handshake: Handshake) -> PrekeySecrets:
    """This device's private keys that ``handshake`` names (None for one
    it does not have: never had, or erased)."""
    with client.profile.lock:
        vault = _vault(client)

        def find(kind: int, key_id: int | None) -> bytes | None:
            if key_id is None:
                return None
            value = vault[_SLOTS[kind]].get(str(key_id))
            return None if value is None else base64.b64decode(value)

        return PrekeySecrets(find(sessions.DH_SIGNED, handshake.signed_prekey_id),
                             find(handshake.kem_kind, handshake.kem_prekey_id),
                             find(sessions.DH_ONE_TIME, handshake.one_time_prekey_id))


def erase_one_time(client: Client, handshake: Handshake) -> None:
    """Forget the one-time prekeys ``handshake`` used (once its first
    message opened): a replay of the handshake then finds none."""
    with client.profile.lock:
        vault = _vault(client)
        if handshake.kem_kind == sessions.KEM_ONE_TIME:
            vault["kemOneTime"].pop(str(handshake.kem_prekey_id), None)
        if handshake.one_time_prekey_id is not None:
            vault["oneTime"].pop(str(handshake.one_time_prekey_id), None)
        client.profile.save()
