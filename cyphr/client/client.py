"""
The Cyphr client library: a profile, a server, and the calls a messenger
makes, with every message sealed and opened on this side.

It uses plain threads (``requests`` for REST, the stock ``python-socketio``
client for realtime), so a script needs no event loop of its own::

    from cyphr.client import Client

    client = Client.open("~/.cyphr", passphrase)
    client.send("bob", "hello")
    for message in client.history(chat_id):
        print(message.sender, message.text)

The identity key signs only what this client builds itself, each kind
under its own label (:mod:`cyphr.signing`): login statements naming their
purpose, the server's origin, the Cyphr ID and the device; key bindings;
messages. It never signs bytes the server chose, and it never signs in
again on its own more than a few times an hour.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as NaclCryptoError

from cyphr import signing
from cyphr import rosters
from cyphr.client import (
    attachments,
    backup,
    crypto,
    devices,
    groups,
    sealing,
    sessionbook,
    sessionkeys,
    sessionmessages,
)
from cyphr.client.attachcrypto import AttachmentError, Pointer
from cyphr.client.crypto import (
    CryptoError,
    Identity,
    KeyRefused,
    Prekey,
    PublishedKey,
    b64,
)
from cyphr.client.devices import Device, LinkCode, LinkRequest
from cyphr.client.http import ApiError, ClientError, Http, check_server, segment
from cyphr.client.localstore import LocalStore
from cyphr.client.profile import Profile
from cyphr.client.sessions import Bundle, Handshake, Me, PrekeySecrets
from cyphr.rosters import RosterState

if TYPE_CHECKING:
    from cyphr.client.realtime import Listener

Progress = Callable[[int, int], None]

_log = logging.getLogger(__name__)

PREKEY_BATCH = 100  # the most the server takes in one call
PREKEY_LOW = 20  # top up when fewer than this many are left on the server
# Signing in again on its own (a session ended) is what made the v1 client
# a signing oracle: at most this many times per window, then the user must.
AUTO_LOGIN_LIMIT = 3
AUTO_LOGIN_WINDOW_MS = 3600 * 1000
USED_PREKEYS_KEPT = 2000  # per contact: the one-time prekeys already sealed to
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_GROUP_NAME_AAD = b"cyphr-group-name-v1"
_SESSION_CODES = {"INVALID_TOKEN", "TOKEN_EXPIRED", "TOKEN_REVOKED", "UNAUTHORIZED"}
PIN_BACKUP_FORMAT = 1


class IdentityChanged(ClientError):
    """A contact's identity key is not the one pinned. Identity keys come
    from the recovery phrase and stay the same through a recovery, so this
    is a hard block: nothing is sealed to or accepted from the new key until
    the user compares the new safety number with the contact and accepts
    exactly that number."""

    def __init__(self, cyphr_id: str, safety_number: str,
                 pinned_safety_number: str | None = None) -> None:
        had = (f"The safety number you had with {cyphr_id} was {pinned_safety_number}; "
               if pinned_safety_number else "")
        super().__init__(
            f"{cyphr_id}'s identity key has changed: refusing to use it. {had}"
            f"{'the' if had else 'The'} key the server shows now gives {safety_number}. "
            f"Identity keys do not change when a device is recovered, so this may be the "
            f"server or someone in the middle. Only if "
            f"{cyphr_id} reads you the same new number in person or over another channel, "
            f"run `cyphr-client verify {cyphr_id} --accept NUMBER` with the number you compared")
        self.cyphr_id = cyphr_id
        self.pinned_safety_number = pinned_safety_number
        self.safety_number = safety_number


@dataclass(frozen=True)
class Contact:
    cyphr_id: str
    identity_key: bytes
    kyber_public_key: bytes  # the main key, checked (v2 binding, not expired, no rollback)
    safety_number: str
    verified: bool  # the user compared the safety number and said so
    kyber_key_id: int = 0


@dataclass(frozen=True)
class Receipts:
    """Who of a chat's other members one's own message reached and who
    read it, as history and sync give them (a read counts as reached)."""

    delivered: tuple[str, ...] = ()
    read: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: Any) -> Receipts | None:
        """The server's ``receipts``; None when absent or not of its shape
        (a server is not trusted to send what it should)."""
        if not isinstance(value, dict):
            return None
        delivered, read = value.get("delivered"), value.get("read")
        if not (isinstance(delivered, list) and isinstance(read, list)
                and all(isinstance(user, str) for user in delivered + read)):
            return None
        return cls(tuple(delivered), tuple(read))

    def as_json(self) -> dict[str, list[str]]:
        return {"delivered": list(self.delivered), "read": list(self.read)}


@dataclass(frozen=True)
class Message:
    """A message as its reader sees it. ``text`` is None when it could not
    be opened (``error`` says why) or was deleted; ``verified`` is True
    only when the sender's v2 signature checked against the pinned key, or
    the message came over a session with a device of the pinned identity
    (then ``timestamp`` is the sender's clock, not the server's). A
    v1 message has its text, ``verified`` False and an ``error`` saying
    that its signature proves nothing. ``contact_verified`` says the user
    compared the sender's safety number (always True for one's own).
    ``receipts``: on one's own messages from history and sync, who got and
    who read it when they were fetched (None elsewhere). ``restored``: read
    from the history backup (cyphr.client.backup), not opened here.

    A file message (``message_type`` file, image, audio or video:
    cyphr.client.attachments) has its ``attachment``, the pointer to the
    encrypted file, key included, and its caption, or "", as ``text``. A
    pointer that is refused makes ``text`` None and ``error`` say why.
    Neither the repr nor :meth:`as_json` shows the pointer's key or
    digest."""

    id: str
    chat_id: str
    seq: int
    sender: str
    timestamp: str
    message_type: str
    text: str | None
    verified: bool
    error: str | None = None
    client_message_id: str | None = None
    contact_verified: bool = False
    receipts: Receipts | None = None
    # Over sessions: how many messages the sender's device sent to the chat
    # just before this one that this device has not seen (a gap to show).
    missing: int = 0
    restored: bool = False
    attachment: Pointer | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        shape = {"id": self.id, "chatId": self.chat_id, "seq": self.seq, "sender": self.sender,
                 "timestamp": self.timestamp, "messageType": self.message_type, "text": self.text,
                 "verified": self.verified, "error": self.error,
                 "clientMessageId": self.client_message_id,
                 "contactVerified": self.contact_verified}
        if self.receipts is not None:
            shape["receipts"] = self.receipts.as_json()
        if self.missing:
            shape["missing"] = self.missing
        if self.restored:
            shape["restored"] = True
        if self.attachment is not None:
            shape["attachment"] = attachments.public_json(self.attachment)
        return shape


def _device_id_in(answer: dict[str, Any], default: Any) -> Any:
    """The ``deviceId`` a register, login or recover answer names, else ``default``."""
    device_id = answer.get("deviceId")
    if isinstance(device_id, int) and not isinstance(device_id, bool) and device_id >= 1:
        return device_id
    return default


def is_chat_id(value: str) -> bool:
    return bool(_UUID.match(value))


def new_fingerprint() -> str:
    """The device fingerprint: random, made once per device and profile."""
    return hashlib.sha256(os.urandom(32)).hexdigest()


def _key_digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:32]


class Client:
    def __init__(self, profile: Profile, server: str | None = None, *,
                 verify_tls: bool | str = True, clock: Callable[[], float] = time.time) -> None:
        self.profile = profile
        server = server or profile.settings.get("server")
        if not server:
            raise ClientError("no server given (--server or CYPHR_SERVER)")
        self.http = Http(server, verify=verify_tls)
        self.clock = clock
        self.identity = Identity(base64.b64decode(profile.vault["seed"]),
                                 int(profile.vault.get("generation", 0)))
        self.http.token = profile.vault.get("token")
        # (Cyphr ID, device id): after that device had no prekey left, its own key this long.
        self._claim_paused: dict[tuple[str, int], float] = {}
        # The devices the last message sealed here left out, and why: their
        # keys are not signed by their identity's pinned key (told to the user).
        self.refused_devices: list[tuple[str, int, str]] = []
        self._chat_cache: dict[str, dict[str, Any]] = {}
        self._backup_lock = threading.Lock()
        self._wallet_texts: dict[str, tuple[str, str]] = {}
        self._display_names: dict[str, str | None] = {}
        # Set by recover(): how many pins the backup restored, or why not.
        self.restored_pins: int | None = None
        self.pin_backup_error: str | None = None
        # Set by recover() and link(): how many messages the history backup
        # restored (cyphr.client.backup), or why none.
        self.restored_messages: int | None = None
        self.history_backup_error: str | None = None
        self._history_backup_lock = threading.RLock()
        # Why the last message was sealed as version 3 rather than over
        # sessions (a device of the chat cannot be reached so), or None.
        self.no_session: str | None = None
        self._store: LocalStore | None = None
        self._store_lock = threading.Lock()
        # Groups' roster states checked in this process (cyphr.client.groups),
        # and chats known to be direct (they have none).
        self._rosters: dict[str, list[RosterState]] = {}
        self._not_groups: set[str] = set()
        # The members the server listed for the last group message sent
        # here that the group's roster does not have: not sealed to.
        self.ghost_members: list[str] = []

    # -- profiles ---------------------------------------------------------

    @classmethod
    def init(cls, directory: str | Path, passphrase: str, server: str,
             phrase: str | None = None, **kwargs: Any) -> tuple[Client, str]:
        """A new profile with a new identity; answers the client and the
        recovery phrase, which is not stored anywhere: show it once."""
        # A server this client may not talk to leaves no profile behind.
        check_server(server, kwargs.get("verify_tls", True))
        phrase = crypto.normalize_phrase(phrase) if phrase else crypto.new_phrase()
        vault = {"seed": b64(crypto.phrase_seed(phrase)), "generation": 0,
                 "fingerprint": new_fingerprint(), "prekeys": {}, "nextPrekeyId": 1,
                 "pins": {}, "contentKeys": {}, "groupKeys": {}}
        profile = Profile.create(Path(directory).expanduser(), passphrase,
                                 {"server": server.rstrip("/")}, vault)
        return cls(profile, **kwargs), phrase

    @classmethod
    def open(cls, directory: str | Path, passphrase: str, server: str | None = None,
             **kwargs: Any) -> Client:
        profile = Profile.open(Path(directory).expanduser(), passphrase)
        client = cls(profile, server, **kwargs)
        # A server given for a profile not registered yet becomes its server;
        # a registered identity keeps the server it is registered on (a
        # different one is used for this run only).
        if server and not profile.settings.get("cyphrId") \
                and server.rstrip("/") != profile.settings.get("server"):
            with profile.lock:
                profile.settings["server"] = server.rstrip("/")
                profile.save()
        return client

    def close(self) -> None:
        self.http.close()
        if self._store is not None:
            self._store.close()
        self.profile.close()

    @property
    def store(self) -> LocalStore:
        """The profile's local store (cyphr.client.localstore): sessions,
        counters and the messages this device read or sent."""
        with self._store_lock:
            if self._store is None:
                self._store = LocalStore.open(self.profile)
            return self._store

    @property
    def cyphr_id(self) -> str:
        cyphr_id = self.profile.settings.get("cyphrId")
        if not cyphr_id:
            raise ClientError("this profile has no Cyphr ID yet (run `cyphr-client register`)")
        return cyphr_id

    @property
    def origin(self) -> str:
        """The server's origin as statements and wallet links name it: the
        server this client talks to (the profile's, or this run's). A
        statement made for one origin is refused by a server of another, so
        a server that relays it (a phishing one) gains nothing."""
        try:
            return signing.normalize_origin(self.http.server)
        except ValueError as e:
            raise ClientError(str(e)) from None

    def _now(self) -> int:
        """Now, in ms since the epoch."""
        return int(self.clock() * 1000)

    def _save(self, **vault: Any) -> None:
        with self.profile.lock:
            self.profile.vault.update(vault)
            self.profile.save()

    def _set_session(self, answer: dict[str, Any]) -> None:
        self.http.token = answer["token"]
        self._save(token=answer["token"], tokenExpiresAt=answer.get("expiresAt"))

    # -- identity ---------------------------------------------------------

    def _challenge(self, cyphr_id: str) -> tuple[str, bytes]:
        answer = self.http.call("POST", "/api/cyphr-id/challenge", {"cyphrId": cyphr_id}, auth=False)
        challenge_id = answer.get("challengeId")
        if not isinstance(challenge_id, str) or not 0 < len(challenge_id) <= 64 \
                or "\n" in challenge_id or "\r" in challenge_id:
            raise ClientError("the server's challenge id is not one: refusing to sign for it")
        try:
            challenge = crypto.unb64(answer.get("challenge"), "the challenge")
        except CryptoError as e:
            raise ClientError(f"{e}: refusing to sign it") from None
        # Checked before anything is signed: a challenge is 32 random bytes,
        # never something of the server's choosing.
        if len(challenge) != signing.CHALLENGE_BYTES:
            raise ClientError(f"the server's challenge is {len(challenge)} bytes, not "
                              f"{signing.CHALLENGE_BYTES}: refusing to sign it")
        return challenge_id, challenge

    def _statement(self, purpose: str, cyphr_id: str, fingerprint: str) -> dict[str, str]:
        """A signed login statement for ``purpose``, made here from what this
        client knows, with a fresh challenge: the body fields challengeId,
        statement and signature."""
        origin = self.origin
        challenge_id, challenge = self._challenge(cyphr_id)
        statement = signing.AuthStatement(purpose, origin, cyphr_id,
                                          signing.device_hash(fingerprint), challenge_id, challenge)
        return {"challengeId": challenge_id, "statement": b64(statement.encode()),
                "signature": b64(statement.sign(self.identity.signing_key))}

    def register(self, cyphr_id: str, display_name: str | None = None,
                 prekeys: int = PREKEY_BATCH, progress: Progress | None = None) -> dict[str, Any]:
        if self.profile.settings.get("cyphrId"):
            raise ClientError(f"this profile is already {self.profile.settings['cyphrId']}")
        fingerprint = self.profile.vault["fingerprint"]
        now = self._now()
        # The main key's signature names its owner: it is made for the Cyphr
        # ID chosen now.
        main_key = self.identity.main_key_form(cyphr_id, now)
        body = {
            "cyphrId": cyphr_id,
            "publicKey": b64(self.identity.public_key),
            **main_key,
            "deviceFingerprint": fingerprint,
            **self._statement(signing.REGISTER, cyphr_id, fingerprint),
        }
        if display_name:
            body["displayName"] = display_name
        answer = self.http.call("POST", "/api/cyphr-id/register", body, auth=False)
        with self.profile.lock:
            # Saved under the same lock as changed: another process's save
            # in between would otherwise replace the change.
            # Registering makes device 1 (a server of before devices says nothing).
            self.profile.settings.update(cyphrId=answer["cyphrId"], userId=answer["userId"],
                                         deviceId=_device_id_in(answer, 1))
            self._save(mainKey=self._main_key_record(main_key))
            self._set_session(answer)
        if prekeys:
            self.upload_prekeys(prekeys, progress)
        self._start_sessions(prekeys)
        return answer

    def login(self, totp_code: str | None = None) -> dict[str, Any]:
        fingerprint = self.profile.vault["fingerprint"]
        body = {"cyphrId": self.cyphr_id, "deviceFingerprint": fingerprint,
                **self._statement(signing.LOGIN, self.cyphr_id, fingerprint)}
        if totp_code:
            body["totpCode"] = totp_code
        answer = self.http.call("POST", "/api/cyphr-id/login", body, auth=False)
        with self.profile.lock:
            device_id = _device_id_in(answer, self.profile.settings.get("deviceId"))
            if device_id is not None:
                self.profile.settings["deviceId"] = device_id
            self._set_session(answer)
        self._maintain_main_key()
        return answer

    def _automatic_login(self, why: str) -> None:
        """Sign in again without the user asking: at most AUTO_LOGIN_LIMIT
        times an hour for this profile, each logged."""
        now = self._now()
        with self.profile.lock:
            recent = [t for t in self.profile.vault.get("autoLogins", [])
                      if isinstance(t, int) and 0 <= now - t < AUTO_LOGIN_WINDOW_MS]
            if len(recent) >= AUTO_LOGIN_LIMIT:
                raise ClientError(
                    f"the session with {self.origin} ended ({why}) and this profile already "
                    f"signed in on its own {len(recent)} times in the last hour; it signs "
                    f"nothing more by itself: run `cyphr-client login`")
            recent.append(now)
            self.profile.vault["autoLogins"] = recent
            self.profile.save()
        _log.warning("Signing in to %s again without being asked (%s): automatic sign-in "
                     "%d of at most %d an hour", self.origin, why, len(recent), AUTO_LOGIN_LIMIT)
        self.login()

    @classmethod
    def recover(cls, directory: str | Path, passphrase: str, server: str, phrase: str,
                cyphr_id: str, prekeys: int = PREKEY_BATCH, progress: Progress | None = None,
                totp_code: str | None = None,
                ask_totp: Callable[[], str | None] | None = None, **kwargs: Any) -> Client:
        """This identity on a new device: a new profile from the phrase. The
        server makes this device the identity's only one, removing the
        others and ending their sessions. The pins of the old device come back from the encrypted
        pin backup (``restored_pins``; ``pin_backup_error`` says why not), and its messages
        from the history backup when it kept one (``restored_messages``;
        ``history_backup_error`` says why not).
        An account with two-factor login needs ``totp_code``; without one,
        ``ask_totp`` is asked for it when the server says it is needed."""
        client, _ = cls.init(directory, passphrase, server, phrase, **kwargs)
        fingerprint = client.profile.vault["fingerprint"]
        while True:
            body = {"cyphrId": cyphr_id, "newDeviceFingerprint": fingerprint,
                    **client._statement(signing.RECOVER, cyphr_id, fingerprint)}
            if totp_code:
                body["totpCode"] = totp_code
            try:
                answer = client.http.call("POST", "/api/cyphr-id/recover", body, auth=False)
            except ApiError as e:
                if e.code != "TOTP_REQUIRED" or totp_code or ask_totp is None:
                    raise
                totp_code = ask_totp()
                if not totp_code:
                    raise
                continue  # a statement is good for one challenge: a new one
            break
        with client.profile.lock:
            client.profile.settings["cyphrId"] = cyphr_id
            device_id = _device_id_in(answer, None)
            if device_id is not None:
                client.profile.settings["deviceId"] = device_id
            client._set_session(answer)
        # Before anything else is pinned: the pins the old device had.
        client._restore_pins()
        # The main ML-KEM key may have been rotated since the phrase was
        # made: take its generation, so that messages sealed to it open here.
        client._adopt_published_key(client._directory(cyphr_id), top_up=False)
        if prekeys:
            client.upload_prekeys(prekeys, progress)
        client._start_sessions(prekeys)
        # The past, from the history backup when the account keeps one:
        # this device takes over writing it.
        client._restore_history(keep_on=True)
        return client

    def _call(self, method: str, path: str, body: Any = None,
              params: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.http.token is None:
            self._automatic_login("no session")
        try:
            return self.http.call(method, path, body, params=params)
        except ApiError as e:
            if e.status != 401 or e.code not in _SESSION_CODES:
                raise
            why = e.code
        with self.profile.lock:
            saved = self.profile.vault.get("token")
        if saved is not None and saved != self.http.token:
            # Another process using this profile signed in since: its
            # session is this one's too.
            self.http.token = saved
            try:
                return self.http.call(method, path, body, params=params)
            except ApiError as e:
                if e.status != 401 or e.code not in _SESSION_CODES:
                    raise
        self._automatic_login(f"the server answered {why}")  # TOTP users must do it by hand
        return self.http.call(method, path, body, params=params)

    def whoami(self) -> dict[str, Any]:
        return self.user(self.cyphr_id)

    def user(self, cyphr_id: str) -> dict[str, Any]:
        """A user's public profile (``displayName`` among it)."""
        user = self._call("GET", f"/api/cyphr-id/user/{segment(cyphr_id)}")["user"]
        # Lookups are rate limited: one made for another reason (presence)
        # also answers display_name.
        name = user.get("displayName") if isinstance(user, dict) else None
        self._display_names[cyphr_id] = name if isinstance(name, str) and name else None
        return user

    def display_name(self, cyphr_id: str) -> str | None:
        """A user's display name as the server shows it (None when it has
        none, or the user is not known or gone); asked once per run."""
        if cyphr_id not in self._display_names:
            try:
                name = self.user(cyphr_id).get("displayName")
            except ApiError:
                name = None
            self._display_names[cyphr_id] = name if isinstance(name, str) and name else None
        return self._display_names[cyphr_id]

    def contacts(self) -> list[str]:
        """The people this profile knows: those pinned, and those it has a
        direct chat with, sorted."""
        with self.profile.lock:
            known = set(self.profile.vault.get("pins", {}))
        me = self.cyphr_id
        for chat in self.chats():
            if chat["chatType"] == "direct":
                known.update(p for p in chat["participants"] if p != me)
        known.discard(me)
        return sorted(known)

    def logout(self) -> None:
        if self.http.token is not None:
            try:
                self.http.call("POST", "/api/cyphr-id/logout", {})
            except ApiError as e:
                if e.status != 401:
                    raise
        self.http.token = None
        self._save(token=None, tokenExpiresAt=None)

    def delete_account(self) -> None:
        """Delete this identity from the server. Never done again on its own:
        a session that ended makes it fail (sign in, then delete)."""
        self.whoami()  # a live session first (this may sign in again)
        fingerprint = self.profile.vault["fingerprint"]
        self.http.call("DELETE", "/api/cyphr-id/account", {
            **self._statement(signing.DELETE, self.cyphr_id, fingerprint),
            "deviceFingerprint": fingerprint})
        self.http.token = None
        with self.profile.lock:
            self.profile.settings["deleted"] = True
            self._save(token=None, tokenExpiresAt=None, prekeys={})

    # -- keys -------------------------------------------------------------

    @staticmethod
    def _main_key_record(form: dict[str, Any]) -> dict[str, int]:
        return {"keyId": form["kyberKeyId"],
                "createdAt": crypto.parse_iso_ms(form["kyberKeyCreatedAt"], "createdAt"),
                "expiresAt": crypto.parse_iso_ms(form["kyberKeyExpiresAt"], "expiresAt")}

    def _publish_main_key(self, identity: Identity) -> None:
        """Sign ``identity``'s main key (its generation is its key id) for
        the next 180 days and publish it."""
        form = identity.main_key_form(self.cyphr_id, self._now())
        self._call("POST", "/api/messaging/store-public-key", form)
        self.identity = identity
        self._save(generation=identity.generation, mainKey=self._main_key_record(form))

    def _maintain_main_key(self) -> None:
        """At login: a profile from before v2 signatures re-signs its main key
        under v2 (and publishes v2 prekeys: the server drops the v1 ones); a
        main key with fewer than 150 days left is renewed."""
        with self.profile.lock:
            record = self.profile.vault.get("mainKey")
        if record is None and not devices.has_device_key(self):
            self._adopt_published_key(self._directory(self.cyphr_id))
        else:
            self.renew_main_key()

    def renew_main_key(self, force: bool = False) -> bool:
        """Sign the main key again (same key, same id, new times) when fewer
        than 150 days of its validity are left; answers whether it did. A
        linked device renews its own device key instead."""
        if devices.has_device_key(self):
            return devices.renew_device_key(self, force)
        with self.profile.lock:
            record = self.profile.vault.get("mainKey")
        if not force and record is not None and record.get("keyId") == self.identity.generation \
                and record["expiresAt"] - self._now() >= crypto.MAIN_KEY_RENEW_MS:
            return False
        self._publish_main_key(self.identity)
        return True

    def _adopt_published_key(self, published: dict[str, Any], top_up: bool = True) -> None:
        """Make this device's main key the one its directory entry publishes
        (found by its key id, or for a v1 key by trying generations), and
        make sure it is published with a v2 signature that is not due
        (after a v1 one, with v2 prekeys too unless ``top_up`` is False)."""
        key = published.get("kyberPublicKey")
        key_id = published.get("kyberKeyId")
        version = published.get("kyberKeySignatureVersion")
        generation = None
        if version == 2 and isinstance(key_id, int) and not isinstance(key_id, bool) \
                and 0 <= key_id < 2**32 and self._kem_public(key_id) == key:
            generation = key_id
        elif version != 2:
            generation = next((g for g in range(1000) if self._kem_public(g) == key), None)
        if generation is None:
            # Not one of ours (an older client's key, or not this phrase's):
            # publish our own, above whatever id the directory holds.
            above = key_id + 1 if version == 2 and isinstance(key_id, int) else 0
            self._publish_main_key(Identity(self.identity.seed, max(above, self.identity.generation)))
        elif version != 2:
            _log.warning("Re-signing the main key of %s on %s with a v2 key signature",
                         self.cyphr_id, self.origin)
            self._publish_main_key(Identity(self.identity.seed, generation))
        else:
            self.identity = Identity(self.identity.seed, generation)
            try:
                record = {"keyId": generation,
                          "createdAt": crypto.parse_iso_ms(published.get("kyberKeyCreatedAt"), "createdAt"),
                          "expiresAt": crypto.parse_iso_ms(published.get("kyberKeyExpiresAt"), "expiresAt")}
            except KeyRefused:
                record = {"keyId": generation, "createdAt": 0, "expiresAt": 0}  # renewed below
            self._save(generation=generation, mainKey=record)
            self.renew_main_key()
            return
        if version != 2 and top_up:
            # The server dropped the v1 one-time prekeys: publish v2 ones.
            self.top_up_prekeys()

    def _kem_public(self, generation: int) -> str:
        return b64(self.identity.kem_key_of(generation).public_key().public_bytes_raw())

    def rotate_kyber(self, to_generation: int | None = None) -> int:
        """Publish the main key of the next generation (its key id); a
        linked device publishes a new device key (answers its key id)."""
        if devices.has_device_key(self):
            return devices.publish_device_key(self, rotate=True)
        generation = self.identity.generation + 1 if to_generation is None else to_generation
        self._publish_main_key(Identity(self.identity.seed, generation))
        return generation

    def upload_prekeys(self, count: int, progress: Progress | None = None) -> int:
        """Make ``count`` one-time prekeys, keep their secrets in the vault,
        and publish them (each signed as a one-time prekey of this Cyphr ID,
        valid 90 days); answers how many the server now holds."""
        total = 0
        made = 0
        owner = self.cyphr_id
        while made < count:
            batch = []
            with self.profile.lock:
                next_id = int(self.profile.vault.get("nextPrekeyId", 1))
                for key_id in range(next_id, next_id + min(PREKEY_BATCH, count - made)):
                    batch.append(Prekey.generate(key_id))
                    if progress:
                        progress(made + len(batch), count)
                for prekey in batch:
                    self.profile.vault["prekeys"][str(prekey.key_id)] = b64(prekey.seed)
                self.profile.vault["nextPrekeyId"] = next_id + len(batch)
                self.profile.save()  # secrets first: never a published key without its secret
            now = self._now()
            answer = self._call("POST", "/api/keys/prekeys",
                                {"prekeys": [p.upload_form(self.identity, owner, now) for p in batch]})
            total = answer["total"]
            made += len(batch)
        return total

    def prekeys_remaining(self) -> int:
        return int(self._call("GET", "/api/keys/count")["remaining"])

    def top_up_prekeys(self, low: int = PREKEY_LOW, target: int = PREKEY_BATCH,
                       progress: Progress | None = None) -> int:
        """Publish more one-time prekeys when fewer than ``low`` are left (and
        renew the main key's signature when it is due)."""
        self.renew_main_key()
        remaining = self.prekeys_remaining()
        if remaining >= low:
            return 0
        self.upload_prekeys(target - remaining, progress)
        return target - remaining

    # -- contacts ---------------------------------------------------------

    def _directory(self, cyphr_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/messaging/public-key/{segment(cyphr_id)}")

    @staticmethod
    def _identity_key_in(answer: dict[str, Any], cyphr_id: str) -> bytes:
        try:
            return crypto.unb64(answer.get("publicKey"), f"{cyphr_id}'s identity key", 32)
        except CryptoError as e:
            raise ClientError(str(e)) from None

    def _checked_key(self, cyphr_id: str, identity_key: bytes, **fields: Any) -> PublishedKey:
        try:
            return crypto.check_published_key(identity_key, cyphr_id, now=self._now(), **fields)
        except KeyRefused as e:
            raise ClientError(str(e)) from None

    def contact(self, cyphr_id: str) -> Contact:
        """A user's keys, checked: the identity key must be the pinned one
        (pinned on first use), and the main ML-KEM key must be bound to this
        Cyphr ID by a v2 signature of that identity key, unexpired, and not
        older than one seen before."""
        answer = self._directory(cyphr_id)
        identity_key = self._identity_key_in(answer, cyphr_id)
        self._check_pin(cyphr_id, identity_key)
        main_key = self._checked_key(
            cyphr_id, identity_key, one_time=False, key_id=answer.get("kyberKeyId"),
            public_key=answer.get("kyberPublicKey"), signature=answer.get("kyberKeySignature"),
            created_at=answer.get("kyberKeyCreatedAt"), expires_at=answer.get("kyberKeyExpiresAt"),
            signature_version=answer.get("kyberKeySignatureVersion"))
        pin = self._pinned(cyphr_id, identity_key, main_key)
        return Contact(cyphr_id, identity_key, main_key.public_key,
                       self.safety_number_with(cyphr_id, identity_key), pin.get("verified", False),
                       main_key.key_id)

    def _check_pin(self, cyphr_id: str, identity_key: bytes) -> None:
        with self.profile.lock:
            pin = self.profile.vault.get("pins", {}).get(cyphr_id)
        if pin is not None and pin["identityKey"] != b64(identity_key):
            raise IdentityChanged(
                cyphr_id, self.safety_number_with(cyphr_id, identity_key),
                self.safety_number_with(cyphr_id, base64.b64decode(pin["identityKey"])))

    def _pinned(self, cyphr_id: str, identity_key: bytes,
                main_key: PublishedKey | None = None) -> dict[str, Any]:
        """The pin of ``cyphr_id`` (made now if there is none), after checking
        ``main_key`` against the newest main key seen (ids never go back, and
        one id is one key)."""
        changed = False
        with self.profile.lock:
            pins = self.profile.vault.setdefault("pins", {})
            pin = pins.get(cyphr_id)
            if pin is None:
                pin = {"identityKey": b64(identity_key), "verified": False}
                changed = True
            elif pin["identityKey"] != b64(identity_key):
                self._check_pin(cyphr_id, identity_key)
            if main_key is not None:
                highest = pin.get("highestKeyId")
                if highest is not None and main_key.key_id < highest:
                    raise ClientError(
                        f"the server shows {cyphr_id}'s main key {main_key.key_id}, older than "
                        f"key {highest} already seen: refusing it (a rollback)")
                digest = _key_digest(main_key.public_key)
                if main_key.key_id == highest and pin.get("mainKey") not in (None, digest):
                    raise ClientError(
                        f"the server shows another key as {cyphr_id}'s main key {highest} than "
                        f"the one seen before: refusing it")
                if highest is None or main_key.key_id > highest:
                    pin = dict(pin, highestKeyId=main_key.key_id, mainKey=digest)
                    changed = True
            if changed:
                pins[cyphr_id] = pin
                self.profile.save()
        if changed:
            self.backup_pins()
        return pin

    def _use_prekey(self, cyphr_id: str, key: PublishedKey) -> None:
        """Remember a one-time prekey sealed to, refusing one handed out
        before: the server must never give the same prekey twice."""
        mark = f"{key.key_id}:{_key_digest(key.public_key)}"
        with self.profile.lock:
            used = self.profile.vault.setdefault("usedPrekeys", {}).setdefault(cyphr_id, [])
            if mark in used:
                raise ClientError(f"the server handed out {cyphr_id}'s one-time prekey "
                                  f"{key.key_id} a second time: refusing it")
            used.append(mark)
            del used[:-USED_PREKEYS_KEPT]
            self.profile.save()

    def accept_identity(self, cyphr_id: str, number: str) -> Contact:
        """Pin ``cyphr_id``'s identity key as verified, only if the safety
        number it gives is ``number`` (the one the user compared with the
        contact; spaces do not matter). Otherwise ClientError and nothing
        changes."""
        try:
            wanted = crypto.normalize_safety_number(number)
        except ValueError:
            raise ClientError(f"{number!r} is not a safety number (60 digits)") from None
        identity_key = self._identity_key_in(self._directory(cyphr_id), cyphr_id)
        shown = self.safety_number_with(cyphr_id, identity_key)
        if crypto.normalize_safety_number(shown) != wanted:
            # The number of the key shown now is not repeated here: it is to
            # be compared with the contact (`verify`), not copied from an error.
            raise ClientError(f"the safety number you gave does not match {cyphr_id}'s identity "
                              f"key as the server shows it now: nothing was pinned. Compare "
                              f"again (`cyphr-client verify {cyphr_id}`)")
        with self.profile.lock:
            pins = self.profile.vault.setdefault("pins", {})
            old = pins.get(cyphr_id)
            pin = {"identityKey": b64(identity_key), "verified": True}
            if old is not None and old["identityKey"] == pin["identityKey"]:
                pin = dict(old, verified=True)
            pins[cyphr_id] = pin
            self.profile.save()
        self.backup_pins()
        return self.contact(cyphr_id)

    def safety_number_with(self, cyphr_id: str, identity_key: bytes) -> str:
        return crypto.safety_number(self.cyphr_id, self.identity.public_key, cyphr_id, identity_key)

    def _sender_key(self, cyphr_id: str) -> bytes:
        if cyphr_id == self.profile.settings.get("cyphrId"):
            return self.identity.public_key
        with self.profile.lock:
            pin = self.profile.vault.get("pins", {}).get(cyphr_id)
        if pin is not None:
            return base64.b64decode(pin["identityKey"])
        # Only the identity key: reading a message needs no ML-KEM key of
        # the sender's (who may still be on v1 keys).
        identity_key = self._identity_key_in(self._directory(cyphr_id), cyphr_id)
        self._pinned(cyphr_id, identity_key)
        return identity_key

    def _contact_verified(self, cyphr_id: str) -> bool:
        if cyphr_id == self.profile.settings.get("cyphrId"):
            return True
        with self.profile.lock:
            pin = self.profile.vault.get("pins", {}).get(cyphr_id)
        return bool(pin and pin.get("verified"))

    # -- the devices a message is sealed for ----------------------------------

    @property
    def device_id(self) -> int:
        """This device's id within its identity: from the register, login,
        recover or link answer; asked of the server for an older profile."""
        saved = self.profile.settings.get("deviceId")
        if isinstance(saved, int) and not isinstance(saved, bool) and saved >= 1:
            return saved
        current = [d.device_id for d in devices.own_devices(self) if d.current]
        if len(current) != 1:
            raise ClientError("the server does not say which of the identity's devices this is")
        with self.profile.lock:
            self.profile.settings["deviceId"] = current[0]
            self.profile.save()
        return current[0]

    def _device_keys(self) -> dict[int, bytes] | None:
        return sealing.device_keys(self)

    # -- the pin backup ---------------------------------------------------

    def backup_pins(self) -> bool:
        """Upload the pins, sealed with a key only the recovery phrase gives
        (best effort: a failure is logged); answers whether it worked."""
        with self._backup_lock:
            try:
                with self.profile.lock:
                    counter = int(self.profile.vault.get("pinBackupCounter", 0)) + 1
                    self.profile.vault["pinBackupCounter"] = counter
                    pins = {cyphr_id: {name: pin[name] for name in
                                       ("identityKey", "verified", "highestKeyId", "mainKey")
                                       if name in pin}
                            for cyphr_id, pin in self.profile.vault.get("pins", {}).items()}
                    self.profile.save()
                blob = crypto.seal_pin_backup(self.identity.seed, self.cyphr_id, {
                    "format": PIN_BACKUP_FORMAT, "counter": counter, "time": self._now(),
                    "pins": pins})
                self._call("PUT", "/api/cyphr-id/pin-backup", {"blob": b64(blob)})
            except (ClientError, CryptoError) as e:
                _log.warning("Could not back up the pinned identity keys to %s: %s",
                             self.origin, e)
                return False
        return True

    def _restore_pins(self) -> int:
        """Take the pins of the backup (at recovery); answers how many."""
        try:
            answer = self._call("GET", "/api/cyphr-id/pin-backup")
            backup = crypto.open_pin_backup(self.identity.seed, self.cyphr_id,
                                            crypto.unb64(answer.get("blob"), "the pin backup"))
        except ApiError as e:
            if e.code == "PIN_BACKUP_NOT_FOUND":
                self.restored_pins = 0
                return 0
            self.pin_backup_error = str(e)
        except (ClientError, CryptoError) as e:  # unreachable, or a blob that does not open
            self.pin_backup_error = str(e)
        if self.pin_backup_error is not None:
            _log.warning("The pinned identity keys of %s could not be restored from %s: %s",
                         self.cyphr_id, self.origin, self.pin_backup_error)
            return 0
        restored = {}
        for cyphr_id, pin in backup["pins"].items():
            if not isinstance(pin, dict) or not isinstance(cyphr_id, str):
                continue
            try:
                crypto.unb64(pin.get("identityKey"), "identityKey", 32)
            except CryptoError:
                continue
            entry: dict[str, Any] = {"identityKey": pin["identityKey"],
                                     "verified": pin.get("verified") is True}
            highest = pin.get("highestKeyId")
            if isinstance(highest, int) and not isinstance(highest, bool) and highest >= 0:
                entry["highestKeyId"] = highest
                if isinstance(pin.get("mainKey"), str):
                    entry["mainKey"] = pin["mainKey"]
            restored[cyphr_id] = entry
        with self.profile.lock:
            pins = self.profile.vault.setdefault("pins", {})
            for cyphr_id, entry in restored.items():
                pins.setdefault(cyphr_id, entry)
            counter = backup.get("counter")
            if isinstance(counter, int) and not isinstance(counter, bool):
                self.profile.vault["pinBackupCounter"] = max(
                    counter, int(self.profile.vault.get("pinBackupCounter", 0)))
            self.profile.save()
        self.restored_pins = len(restored)
        return len(restored)

    # -- the history backup (cyphr.client.backup) --------------------------------

    def backup_history(self) -> backup.Written:
        """Write the history backup now (backups must be on); answers its
        size and how many messages it holds."""
        if not backup.state(self).get("on"):
            raise ClientError("the history backup is off: turn it on first (`cyphr-client "
                              "backup on`)")
        return backup.write(self)

    def history_backup_on(self) -> backup.Written:
        """Turn the history backup on: written at once, then rewritten on
        schedule. Whoever has the recovery phrase can read it."""
        return backup.turn_on(self)

    def history_backup_off(self) -> bool:
        """Turn the history backup off and delete the server's copy;
        answers whether there was one."""
        return backup.turn_off(self)

    def history_backup_status(self) -> dict[str, Any]:
        return backup.status(self)

    # -- push wake-ups ------------------------------------------------------

    def register_push(self, endpoint: str, *, kind: str = "unifiedpush",
                      keys: dict[str, str] | None = None) -> dict[str, Any]:
        """Have this device woken at ``endpoint`` (a UnifiedPush
        distributor's, or a Web Push subscription's with its ``keys``
        {p256dh, auth}) when a message waits for it and it has no socket.
        A wake-up names nothing: on one, the app connects (or syncs) and
        reads what waits, as ``listen`` does."""
        subscription: dict[str, Any] = {"endpoint": endpoint}
        if keys is not None:
            subscription["keys"] = keys
        return self._call("PUT", "/api/devices/me/push", {"kind": kind, "subscription": subscription})

    def unregister_push(self) -> None:
        self._call("DELETE", "/api/devices/me/push")

    def push_config(self) -> dict[str, Any]:
        """The kinds of push the server sends and its VAPID public key."""
        return self._call("GET", "/api/push/config")

    def backup_history_if_due(self) -> bool:
        """Rewrite the history backup when it is on and a day old (best
        effort: a failure is logged); answers whether it did."""
        return backup.write_if_due(self)

    def _restore_history(self, *, keep_on: bool) -> None:
        def report(added: int | None, problem: str | None) -> None:
            self.restored_messages, self.history_backup_error = added, problem
        backup.restore_quietly(self, keep_on=keep_on, report=report)

    # -- chats ------------------------------------------------------------

    def chats(self) -> list[dict[str, Any]]:
        """Every chat, page after page (the first as the original call
        asks it; then by ``nextCursor``), newest activity first."""
        chats: list[dict[str, Any]] = []
        path = "/api/messaging/chats"
        while True:
            page = self._call("GET", path)
            chats.extend(page["chats"])
            cursor = page.get("nextCursor")
            if not cursor:
                break
            path = "/api/messaging/chats?limit=500&cursor=" + urllib.parse.quote(cursor, safe="")
        for chat in chats:
            self._chat_cache[chat["chatId"]] = chat
            chat["name"] = self._group_name(chat)
        return chats

    def _chat(self, chat_id: str) -> dict[str, Any] | None:
        if chat_id not in self._chat_cache:
            self.chats()
        return self._chat_cache.get(chat_id)

    def _direct_chat_with(self, cyphr_id: str) -> str | None:
        for refresh in (False, True):
            if refresh:
                self.chats()
            for chat in self._chat_cache.values():
                if chat["chatType"] == "direct" and set(chat["participants"]) == {self.cyphr_id, cyphr_id}:
                    return chat["chatId"]
        return None

    def members(self, chat_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/api/chats/{segment(chat_id)}/members")["members"]

    def send(self, to: str, text: str, message_type: str = "text") -> dict[str, Any]:
        """Seal ``text`` for every member of the chat (``to`` is a chat id) or
        of the direct chat with ``to`` (a Cyphr ID), and send it. (A file
        goes with :meth:`send_file`: readers take a message of a file's
        type for a pointer.)"""
        if message_type in attachments.FILE_TYPES:
            raise ClientError(f"a {message_type} message carries a file: send it with send_file")
        return self._send(to, text.encode("utf-8"), message_type)

    def _send(self, to: str, plaintext: bytes, message_type: str) -> dict[str, Any]:
        return self.send_sealed(to, plaintext, message_type,
                                lambda body: self._call("POST", "/api/messaging/send", body))

    def send_sealed(self, to: str, plaintext: bytes, message_type: str,
                    transmit: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Seal for ``to`` and ``transmit`` the send's body (REST or
        realtime), sealed again once when refused DEVICES_CHANGED: over
        sessions (:func:`cyphr.client.sessionbook.send`) when every device
        of the chat can be reached so, else as version 3
        (:func:`cyphr.client.sealing.send_sealed`; ``no_session`` says why)."""
        target, chat_id, members = self._target(to)
        ghosts: list[str] = []
        roster = None
        if chat_id is not None and is_chat_id(to):
            members, ghosts, roster = groups.recipients(self, chat_id, members)
        self.ghost_members = ghosts
        try:
            answer = sessionbook.send(self, target, chat_id, members, plaintext, message_type,
                                      transmit, ghosts=ghosts, roster=roster)
        except sessionbook.NoSession as e:
            self.no_session = str(e)
            _log.info("Sealing as version 3: %s", e)
            return sealing.send_sealed(self, to, plaintext, message_type, transmit)
        self.no_session = None
        return answer

    def _target(self, to: str) -> tuple[dict[str, str], str | None, list[str]]:
        """Whom a send to ``to`` (a chat id, or a Cyphr ID for the direct
        chat with it) goes to: the send's target field, the chat id (None
        before a first direct message), and the chat's members."""
        if is_chat_id(to):
            return {"chatId": to}, to, [m["cyphrId"] for m in self.members(to)]
        chat_id = self._direct_chat_with(to)
        return ({"chatId": chat_id} if chat_id else {"recipientId": to}, chat_id,
                sorted({self.cyphr_id, to}))

    def sealed(self, to: str, plaintext: bytes, message_type: str = "text") -> dict[str, Any]:
        """The body of a send (REST or ``send_message``) as version 3: the
        plaintext sealed for every member of the chat ``to`` (a chat id),
        or of the direct chat with ``to`` (a Cyphr ID)."""
        target, chat_id, members = self._target(to)
        ghosts: list[str] = []
        if chat_id is not None and is_chat_id(to):
            members, ghosts, _ = groups.recipients(self, chat_id, members)
        client_message_id = str(uuid.uuid4())
        recipients, named = sealing.seal_devices(self, members)
        # A ghost's devices are named (the server lists them), sealed to never.
        for ghost in ghosts:
            named += [{"cyphrId": ghost, "deviceId": d.device_id}
                      for d in devices.devices_of(self, ghost)]
        named.sort(key=lambda d: (d["cyphrId"], d["deviceId"]))
        payload = crypto.seal_to_devices(self.identity, self.cyphr_id, self.device_id, recipients,
                                         plaintext, chat_id=chat_id, message_type=message_type,
                                         client_message_id=client_message_id)
        return {**target, "encryptedPayload": payload, "messageType": message_type,
                "clientMessageId": client_message_id, "devices": named}

    def history(self, chat_id: str, limit: int = 50, before: int | None = None,
                after: int | None = None) -> list[Message]:
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        if after is not None:
            params["after"] = after
        answer = self._call("GET", f"/api/messaging/chat/{segment(chat_id)}", params=params)
        messages = [self.open_message(m) for m in answer["messages"]]
        self.backup_history_if_due()
        return messages

    def sync(self, since: str | None = None, limit: int = 200) -> tuple[list[Message], str, bool]:
        params: dict[str, Any] = {"limit": limit}
        if since:
            params["since"] = since
        answer = self._call("GET", "/api/messaging/sync", params=params)
        messages = [self.open_message(m) for m in answer["messages"]]
        self.backup_history_if_due()
        return messages, answer["cursor"], answer["hasMore"]

    def open_message(self, message: dict[str, Any]) -> Message:
        """Verify and decrypt one message as the server gave it, or read it
        from the local store when this device opened (or sent) it before.
        Never raises for a bad message: the answer's ``error`` says what is
        wrong."""
        def result(text: str | None, verified: bool, error: str | None = None,
                   timestamp: str | None = None, missing: int = 0,
                   restored: bool = False, message_type: str | None = None) -> Message:
            sender = message.get("senderId", "")
            # Receipts only on one's own: no server can make a client say
            # who read another's message.
            receipts = Receipts.parse(message.get("receipts")) if sender == self.cyphr_id else None
            # The type the message was opened with (kept with it): what the
            # server says now could turn a file message's pointer into text.
            if not isinstance(message_type, str):
                message_type = message.get("messageType", "")
            attachment = None
            if text is not None and message_type in attachments.FILE_TYPES:
                try:
                    attachment, text = attachments.parse_file_message(text)
                except AttachmentError as e:
                    text, error = None, f"the file message's attachment is refused: {e}"
            return Message(message.get("id", ""), message.get("chatId", ""), message.get("seq", 0),
                           sender, timestamp or message.get("timestamp", ""),
                           message_type, text, verified, error,
                           message.get("clientMessageId"),
                           verified and isinstance(sender, str) and self._contact_verified(sender),
                           receipts, missing, restored, attachment)

        def kept_result(kept: dict[str, Any]) -> Message:
            if kept.get("problem"):  # a system message found wrong when it was opened
                return result(None, False, kept["problem"])
            shown = sessionbook.shown_time(kept) if "sentAt" in kept else None
            verified = kept.get("verified", True)
            return result(kept["text"], verified, None if verified else crypto.V1_UNVERIFIED,
                          timestamp=shown, missing=int(kept.get("missing", 0)),
                          restored=kept.get("restored") is True,
                          message_type=kept.get("messageType"))

        payload = message.get("encryptedPayload")
        if message.get("deletedAt"):
            return result(None, False, "deleted by its sender")
        kept = self.store.message(message["id"]) if isinstance(message.get("id"), str) else None
        if kept is not None and kept.get("senderId") == message.get("senderId") \
                and kept.get("chatId") == message.get("chatId"):
            return kept_result(kept)
        if payload is None:
            return result(None, False, "the server no longer holds it (every device it was "
                                       "sealed for received it), and this device did not keep it")
        direct_members = None
        if isinstance(payload, dict) and isinstance(payload.get("header"), dict) \
                and payload["header"].get("chatId") is None:
            chat = self._chat(message["chatId"])
            if chat is not None and chat["chatType"] == "direct":
                direct_members = frozenset(chat["participants"])
        if isinstance(payload, dict) and payload.get("version") == sessionmessages.VERSION:
            try:
                kept = sessionbook.open_message(self, message, direct_members)
            except (CryptoError, ClientError) as e:
                return result(None, False, str(e))
            if message.get("messageType") == "system":
                problem = self._system_message(message["chatId"], kept["text"],
                                               message.get("senderId"))
                if problem is not None:
                    # Kept with it: read again, it shows the same.
                    self.store.update_message(message["id"], {"problem": problem})
                    return result(None, False, problem)
            return kept_result(kept)
        try:
            sender_key = self._sender_key(message["senderId"])
            with self.profile.lock:
                vault = self.profile.vault
                content_key = vault.get("contentKeys", {}).get(message["id"])
                prekeys = {int(k): base64.b64decode(v) for k, v in vault.get("prekeys", {}).items()}
            per_device = isinstance(payload, dict) \
                and payload.get("version") == crypto.DEVICE_VERSION
            opened = crypto.open_sealed(
                payload, reader=self.identity, reader_id=self.cyphr_id, sender_key=sender_key,
                envelope=message, prekeys=prekeys, direct_members=direct_members,
                content_key=base64.b64decode(content_key) if content_key else None,
                reader_device=self.device_id if per_device else None,
                device_keys=self._device_keys())
        except (CryptoError, ClientError) as e:
            return result(None, False, str(e))
        text = opened.plaintext.decode("utf-8", errors="replace")
        if opened.key_id is not None and content_key is None:
            # The one-time prekey has done its work: erase its secret, and
            # keep the message in the local store so that it still reads
            # (once, the vault kept its content key instead).
            self.store.add_message({"id": message["id"], "chatId": message["chatId"],
                                    "seq": message.get("seq", 0),
                                    "senderId": message["senderId"], "text": text,
                                    "messageType": message.get("messageType"),
                                    "verified": opened.verified})
            with self.profile.lock:
                self.profile.vault["prekeys"].pop(str(opened.key_id), None)
                self.profile.save()
        if not opened.verified:
            # Old history: readable, but a v1 signature proves nothing, so
            # it neither counts as the sender's word nor changes any key.
            return result(text, False, crypto.V1_UNVERIFIED)
        if message.get("messageType") == "system":
            problem = self._system_message(message["chatId"], text, message.get("senderId"))
            if problem is not None:
                return result(None, False, problem)
        return result(text, True)

    # -- attachments (cyphr.client.attachments) ----------------------------

    def upload_file(self, path: str | os.PathLike[str], *,
                    progress: Progress | None = None) -> Pointer:
        """Encrypt the file at ``path`` and upload it (resumably); answers
        its pointer, for a file message."""
        return attachments.upload_file(self, path, progress=progress)

    def send_file(self, to: str, path: str | os.PathLike[str], caption: str | None = None, *,
                  progress: Progress | None = None) -> dict[str, Any]:
        """Upload the file at ``path`` and send it to ``to`` (as :meth:`send`)
        in a file message, with ``caption``; answers as :meth:`send`."""
        return attachments.send_file(self, to, path, caption, progress=progress)

    def download(self, message_or_pointer: Message | Pointer, dest: str | os.PathLike[str], *,
                 progress: Progress | None = None) -> Path:
        """Download and decrypt a file message's attachment into ``dest`` (a
        file, or a directory to make a new file in); answers the path
        written. AttachmentError, and nothing written, for a blob that is
        not the pointer's."""
        return attachments.download(self, message_or_pointer, dest, progress=progress)

    def forward(self, to: str, message: Message, *,
                progress: Progress | None = None) -> dict[str, Any]:
        """Send a file message's attachment on to ``to`` (the same blob when
        this identity uploaded it, else uploaded again); answers as
        :meth:`send`."""
        return attachments.forward(self, to, message, progress=progress)

    def find_message(self, message_id: str) -> Message | None:
        """A message by its id: kept here, or in a chat's recent history."""
        return attachments.find_message(self, message_id)

    def thumbnail(self, message: Message | Pointer) -> bytes | None:
        """The thumbnail of a file message's image (a small JPEG from the
        reference client), or None: it came in the sealed message, so
        nothing is downloaded."""
        return attachments.thumbnail(message)

    # -- the avatar (cyphr.client.attachments) --------------------------------

    def set_avatar(self, path: str | os.PathLike[str], *,
                   to: list[str] | None = None) -> dict[str, Any]:
        """Make the image at ``path`` (cropped square, at most 512 pixels,
        its metadata dropped) this identity's avatar, encrypted; its key
        goes in a sealed system message to ``to``, by default everyone
        with a direct chat with this identity. Answers ``attachment``,
        ``sentTo`` and ``notSent``."""
        return attachments.set_avatar(self, path, to=to)

    def avatar(self, cyphr_id: str, *, progress: Progress | None = None) -> Path | None:
        """``cyphr_id``'s avatar, decrypted into the profile's cache
        directory, or None when none reached this device (or the server
        names another now)."""
        return attachments.avatar(self, cyphr_id, progress=progress)

    # -- groups -----------------------------------------------------------

    def create_group(self, name: str, members: list[str]) -> str:
        """A group chat with a signed roster (cyphr.client.groups); its name
        is encrypted with a fresh name key, which the roster commits to and
        which goes to the members in a sealed system message."""
        name_key = groups.new_name_key()
        chat_id = groups.create(self, _seal_name(name_key, name), name_key, members)
        with self.profile.lock:
            self.profile.vault.setdefault("groupKeys", {})[chat_id] = b64(name_key)
            self.profile.vault.setdefault("groupNames", {})[chat_id] = name
            self.profile.save()
        groups.states(self, chat_id)  # the first change, checked and kept
        groups.announce(self, chat_id, 1)
        self._share_group_key(chat_id)
        return chat_id

    def _share_group_key(self, chat_id: str, name: str | None = None) -> None:
        """Send the group's name key, and its name (known to this device:
        after a new key, the name the server keeps is sealed under the one
        before), in a sealed system message."""
        with self.profile.lock:
            key = self.profile.vault.get("groupKeys", {}).get(chat_id)
            name = name or self.profile.vault.get("groupNames", {}).get(chat_id)
        if key is not None:
            content = {"groupKey": key, **({"groupName": name} if name else {})}
            self._send(chat_id, json.dumps(content).encode("utf-8"), "system")

    def _system_message(self, chat_id: str, text: str, sender: Any = None) -> str | None:
        """Take what a system message carries (a group's name key and name,
        an announced roster change, a contact's avatar); answers why it is
        refused, if it is."""
        try:
            content = json.loads(text)
        except ValueError:
            return None
        if isinstance(content, dict) and attachments.AVATAR in content:
            try:
                attachments.take_avatar(self, chat_id, sender, content[attachments.AVATAR])
            except (ClientError, CryptoError) as e:
                _log.warning("Refused an avatar in chat %s: %s", chat_id, e)
                return f"an avatar refused: {e}"
            return None
        if isinstance(content, dict) and groups.ANNOUNCED in content:
            try:
                groups.check_announced(self, chat_id, sender, content[groups.ANNOUNCED])
            except (ClientError, ValueError) as e:
                _log.warning("Group %s: %s", chat_id, e)
                return str(e)
            return None
        if isinstance(content, dict) and isinstance(content.get("groupKey"), str):
            try:
                key = base64.b64decode(content["groupKey"], validate=True)
                if not groups.name_key_counts(self, chat_id, key):
                    return None
                # A name only from an admin (the key the roster vouches for).
                name = content.get("groupName") if groups.may_name(self, chat_id, sender) else None
            except (ValueError, ClientError) as e:
                _log.warning("Ignored a name key for group %s: %s", chat_id, e)
                return None
            with self.profile.lock:
                vault = self.profile.vault
                keys, names = vault.setdefault("groupKeys", {}), vault.setdefault("groupNames", {})
                if keys.get(chat_id) != content["groupKey"] or (
                        isinstance(name, str) and names.get(chat_id) != name):
                    keys[chat_id] = content["groupKey"]
                    if isinstance(name, str):
                        names[chat_id] = name
                    self.profile.save()

    def _group_name(self, chat: dict[str, Any]) -> str | None:
        if chat.get("chatType") != "group":
            others = [p for p in chat.get("participants", []) if p != self.cyphr_id]
            if others:
                return others[0]
            # The contact's account is gone and the server lists only this
            # user: the chat is still the one with the contact, whose id
            # the messages in it carry.
            return self._other_sender(chat["chatId"]) or "(a deleted account)"
        with self.profile.lock:
            known = self.profile.vault.get("groupNames", {}).get(chat["chatId"])
        if known is not None:
            return known
        if not chat.get("encryptedName"):
            return None
        with self.profile.lock:
            key = self.profile.vault.get("groupKeys", {}).get(chat["chatId"])
        if key is None:
            # Not heard yet: the name key came in a system message; look
            # for it in the recent history (opening it keeps the key).
            try:
                self.history(chat["chatId"], limit=200)
            except ApiError:
                return None
            with self.profile.lock:
                key = self.profile.vault.get("groupKeys", {}).get(chat["chatId"])
            if key is None:
                return None
        return _open_name(base64.b64decode(key), chat["encryptedName"])

    def _other_sender(self, chat_id: str) -> str | None:
        try:
            answer = self._call("GET", f"/api/messaging/chat/{segment(chat_id)}",
                                params={"limit": 50})
        except ApiError:
            return None
        me = self.cyphr_id
        return next((m["senderId"] for m in answer.get("messages", [])
                     if isinstance(m, dict) and m.get("senderId") not in (None, me)), None)

    def add_member(self, chat_id: str, cyphr_id: str) -> None:
        """Add a member: a signed roster change (a group from before rosters:
        the unsigned route); the new member gets the name key."""
        if groups.current(self, chat_id) is not None:
            state = groups.change(self, chat_id, [rosters.add(cyphr_id)])
            groups.announce(self, chat_id, state.epoch)
        else:
            self._call("POST", f"/api/chats/{segment(chat_id)}/members/{segment(cyphr_id)}", {})
        self._share_group_key(chat_id)

    def remove_member(self, chat_id: str, cyphr_id: str) -> None:
        """Remove a member (or leave, for oneself). In a group with a
        roster, a removal is a signed change with a new name key, sent to
        those who stay."""
        if cyphr_id != self.cyphr_id and groups.current(self, chat_id) is not None:
            chat = self._chat(chat_id)
            name = self._group_name(chat) if chat is not None else None
            key = groups.new_name_key()
            state = groups.change(self, chat_id, [rosters.remove(cyphr_id)], new_name_key=key)
            groups.announce(self, chat_id, state.epoch)
            with self.profile.lock:
                self.profile.vault.setdefault("groupKeys", {})[chat_id] = b64(key)
                if name is not None:
                    self.profile.vault.setdefault("groupNames", {})[chat_id] = name
                self.profile.save()
            self._share_group_key(chat_id, name)
            return
        self._call("DELETE", f"/api/chats/{segment(chat_id)}/members/{segment(cyphr_id)}", {})

    def set_role(self, chat_id: str, cyphr_id: str, role: str) -> None:
        if groups.current(self, chat_id) is not None:
            state = groups.change(self, chat_id, [rosters.set_role(cyphr_id, role)])
            groups.announce(self, chat_id, state.epoch)
            return
        self._call("PUT", f"/api/chats/{segment(chat_id)}/members/{segment(cyphr_id)}/role",
                   {"role": role})

    # -- two-factor and wallet ------------------------------------------

    def totp_generate(self) -> dict[str, Any]:
        return self._call("POST", "/api/auth/totp/generate", {})

    def totp_verify(self, code: str) -> None:
        self._call("POST", "/api/auth/totp/verify", {"code": code})

    def totp_disable(self, code: str) -> None:
        self._call("POST", "/api/auth/totp/disable", {"code": code})

    def wallet_link(self, stellar_secret: str) -> str:
        """Link the Stellar account of ``stellar_secret``: the secret signs,
        here, a SEP-53 message this client builds (never bytes the server
        chose), and never leaves this process. Answers the address."""
        from stellar_sdk import Keypair
        from stellar_sdk.exceptions import Ed25519SecretSeedInvalidError

        try:
            keypair = Keypair.from_secret(stellar_secret.strip())
        except (Ed25519SecretSeedInvalidError, ValueError):
            raise ClientError("not a Stellar secret seed (S...)") from None
        challenge_id, text = self.wallet_link_text(keypair.public_key)
        return self.wallet_link_signed(keypair.public_key, challenge_id,
                                       b64(keypair.sign_message(text)))

    def wallet_link_text(self, stellar_address: str) -> tuple[str, str]:
        """The first step of a link signed in the user's own wallet: answers
        the challenge id and the text to sign there (a SEP-53 "sign message",
        never a transaction). Then :meth:`wallet_link_signed`."""
        from stellar_sdk import Keypair
        from stellar_sdk.exceptions import Ed25519PublicKeyInvalidError

        address = stellar_address.strip()
        try:
            Keypair.from_public_key(address)
        except (Ed25519PublicKeyInvalidError, ValueError):
            raise ClientError("not a Stellar account address (G...)") from None
        challenge_id, challenge = self._challenge(self.cyphr_id)
        try:
            text = signing.wallet_link_text(self.origin, self.cyphr_id, address, challenge_id,
                                            challenge)
        except signing.EncodingError as e:
            raise ClientError(str(e)) from None
        self._wallet_texts[challenge_id] = (address, text)
        return challenge_id, text

    def wallet_link_signed(self, stellar_address: str, challenge_id: str,
                           signature_b64: str) -> str:
        """The second step: send the wallet's SEP-53 signature (base64) of
        the text :meth:`wallet_link_text` gave. Checked here first when that
        text was made by this client object. Answers the linked address."""
        from stellar_sdk import Keypair
        from stellar_sdk.exceptions import BadSignatureError

        address = stellar_address.strip()
        try:
            signature = crypto.unb64(signature_b64.strip(), "the signature", 64)
        except CryptoError as e:
            raise ClientError(f"{e} (a SEP-53 signature is 64 bytes, in base64)") from None
        made = self._wallet_texts.pop(challenge_id, None)
        if made is not None:
            if made[0] != address:
                raise ClientError(f"challenge {challenge_id} was made for {made[0]}, not {address}")
            try:
                Keypair.from_public_key(address).verify_message(made[1], signature)
            except BadSignatureError:
                raise ClientError(f"the signature is not {address}'s SEP-53 signature of the "
                                  f"wallet link text") from None
        answer = self._call("POST", "/api/wallet/link", {
            "stellarAddress": address, "challengeId": challenge_id, "origin": self.origin,
            "signature": b64(signature)})
        return answer["stellarAddress"]

    def wallet_show(self, cyphr_id: str | None = None) -> str:
        return self._call("GET", f"/api/wallet/{segment(cyphr_id or self.cyphr_id)}")["stellarAddress"]

    def wallet_unlink(self) -> None:
        self._call("DELETE", "/api/wallet/link", {})

    # -- devices (cyphr.client.devices) ------------------------------------

    @classmethod
    def link(cls, directory: str | Path, passphrase: str, server: str, *,
             on_code: Callable[[LinkCode], None], **kwargs: Any) -> Client:
        """This identity on a new device, approved by one of its devices: a
        new profile (see :func:`cyphr.client.devices.link`), with the
        messages of the history backup when the account keeps one
        (``restored_messages``; ``history_backup_error`` says why not)."""
        client = devices.link(cls, directory, passphrase, server, on_code=on_code, **kwargs)
        client._start_sessions()
        # The transfer of history: the approving device wrote the backup
        # just before it approved (when backups are on there).
        client._restore_history(keep_on=False)
        return client

    def devices(self) -> list[Device]:
        """This identity's devices, names decrypted, keys checked."""
        return devices.own_devices(self)

    def devices_of(self, cyphr_id: str) -> list[Device]:
        """A user's devices, each key checked against the pinned identity key."""
        return devices.devices_of(self, cyphr_id)

    def rename_device(self, device_id: int, name: str | None) -> None:
        devices.rename_device(self, device_id, name)

    def remove_device(self, device_id: int) -> None:
        devices.remove_device(self, device_id)

    def approve(self, code: str,
                confirm: Callable[[LinkRequest], bool] | None = None) -> int:
        """Approve the new device of link code ``code``: ``confirm`` is shown
        the request (its ``fingerprint`` for the user to compare with the
        new device's screen) and must answer True, or nothing is sent
        (ClientError). Answers the new device's id."""
        request = devices.link_request(self, code)
        if confirm is not None and not confirm(request):
            raise ClientError("not approved: nothing was sent")
        # The new device restores the history backup: a fresh one first,
        # when backups are on (best effort).
        backup.before_link(self)
        return devices.approve(self, request)

    # -- session keys (cyphr.client.sessionkeys) -----------------------------

    def publish_session_keys(self, *, force_one_time: bool = False) -> dict[str, Any]:
        """Publish what is due of this device's session keys; the server's
        stock (``GET /api/sessions/keys``'s answer)."""
        return sessionkeys.publish(self, force_one_time=force_one_time)

    def _start_sessions(self, one_time: int | None = None) -> None:
        """Publish this device's session keys (with ``one_time`` one-time
        prekeys of each kind, as many as the ML-KEM prekeys asked for), so
        that others can start sessions with it. A server that has no
        sessions (404) leaves its messages to version 3."""
        try:
            sessionkeys.publish(self, one_time=None if one_time is None
                                else min(one_time, sessionkeys.ONE_TIME_TARGET))
        except ApiError as e:
            if e.status != 404:
                raise
            _log.info("The server has no sessions: messages go as version 3")

    def session_bundles(self, cyphr_id: str, device_id: int | None = None
                        ) -> tuple[list[Bundle], list[tuple[int, str]]]:
        """``cyphr_id``'s devices' bundles, checked against the pinned
        identity key: (good ones, [(device id, why)] refused)."""
        return sessionkeys.bundles(self, cyphr_id, device_id)

    def session_me(self) -> Me:
        return sessionkeys.me(self)

    def session_secrets(self, handshake: Handshake) -> PrekeySecrets:
        return sessionkeys.secrets(self, handshake)

    def erase_one_time_session_prekeys(self, handshake: Handshake) -> None:
        sessionkeys.erase_one_time(self, handshake)

    # -- realtime ---------------------------------------------------------

    def listener(self, on_message: Callable[[Message], None], **kwargs: Any) -> Listener:
        from cyphr.client import realtime

        return realtime.Listener(self, on_message, **kwargs)


def _seal_name(key: bytes, name: str) -> str:
    nonce = os.urandom(24)
    return b64(nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(
        name.encode("utf-8"), _GROUP_NAME_AAD, nonce, key))


def _open_name(key: bytes, sealed: str) -> str | None:
    try:
        raw = base64.b64decode(sealed)
        return crypto_aead_xchacha20poly1305_ietf_decrypt(
            raw[24:], _GROUP_NAME_AAD, raw[:24], key).decode("utf-8")
    except (ValueError, NaclCryptoError):
        return None
