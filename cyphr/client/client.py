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
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as NaclCryptoError

from cyphr.client import crypto
from cyphr.client.crypto import CryptoError, Identity, Prekey, Recipient, b64
from cyphr.client.http import ApiError, ClientError, Http, segment
from cyphr.client.profile import Profile

if TYPE_CHECKING:
    from cyphr.client.realtime import Listener

Progress = Callable[[int, int], None]

PREKEY_BATCH = 100  # the most the server takes in one call
PREKEY_LOW = 20  # top up when fewer than this many are left on the server
_CLAIM_PAUSE = 600.0  # s: after a target had no prekey left, use its main key this long
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_GROUP_NAME_AAD = b"cyphr-group-name-v1"
_SESSION_CODES = {"INVALID_TOKEN", "TOKEN_EXPIRED", "TOKEN_REVOKED", "UNAUTHORIZED"}


class IdentityChanged(ClientError):
    """A contact's identity key is not the one pinned: it may be a new
    device after a recovery, or someone in the middle. The user must compare
    the safety number and accept the new key explicitly."""

    def __init__(self, cyphr_id: str, safety_number: str) -> None:
        super().__init__(
            f"{cyphr_id}'s identity key has changed. Compare the safety number "
            f"{safety_number} with {cyphr_id} in person or over another channel, then run "
            f"`cyphr-client verify {cyphr_id} --accept`")
        self.cyphr_id = cyphr_id
        self.safety_number = safety_number


@dataclass(frozen=True)
class Contact:
    cyphr_id: str
    identity_key: bytes
    kyber_public_key: bytes
    safety_number: str
    verified: bool  # the user compared the safety number and said so


@dataclass(frozen=True)
class Message:
    """A message as its reader sees it. ``text`` is None when it could not
    be opened (``error`` says why) or was deleted; ``verified`` is True
    only when the sender's signature checked against the pinned key."""

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

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "chatId": self.chat_id, "seq": self.seq, "sender": self.sender,
                "timestamp": self.timestamp, "messageType": self.message_type, "text": self.text,
                "verified": self.verified, "error": self.error,
                "clientMessageId": self.client_message_id}


def is_chat_id(value: str) -> bool:
    return bool(_UUID.match(value))


def new_fingerprint() -> str:
    """The device fingerprint: random, made once per device and profile."""
    return hashlib.sha256(os.urandom(32)).hexdigest()


class Client:
    def __init__(self, profile: Profile, server: str | None = None, *,
                 verify_tls: bool | str = True) -> None:
        self.profile = profile
        server = server or profile.settings.get("server")
        if not server:
            raise ClientError("no server given (--server or CYPHR_SERVER)")
        self.http = Http(server, verify=verify_tls)
        self.identity = Identity(base64.b64decode(profile.vault["seed"]),
                                 int(profile.vault.get("generation", 0)))
        self.http.token = profile.vault.get("token")
        self._claim_paused: dict[str, float] = {}
        self._chat_cache: dict[str, dict[str, Any]] = {}

    # -- profiles ---------------------------------------------------------

    @classmethod
    def init(cls, directory: str | Path, passphrase: str, server: str,
             phrase: str | None = None, **kwargs: Any) -> tuple[Client, str]:
        """A new profile with a new identity; answers the client and the
        recovery phrase, which is not stored anywhere: show it once."""
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

    @property
    def cyphr_id(self) -> str:
        cyphr_id = self.profile.settings.get("cyphrId")
        if not cyphr_id:
            raise ClientError("this profile has no Cyphr ID yet (run `cyphr-client register`)")
        return cyphr_id

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
        return answer["challengeId"], base64.b64decode(answer["challenge"])

    def _signed_challenge(self, cyphr_id: str) -> dict[str, str]:
        challenge_id, challenge = self._challenge(cyphr_id)
        return {"challengeId": challenge_id, "signature": b64(self.identity.sign(challenge))}

    def register(self, cyphr_id: str, display_name: str | None = None,
                 prekeys: int = PREKEY_BATCH, progress: Progress | None = None) -> dict[str, Any]:
        if self.profile.settings.get("cyphrId"):
            raise ClientError(f"this profile is already {self.profile.settings['cyphrId']}")
        body = {
            "cyphrId": cyphr_id,
            "publicKey": b64(self.identity.public_key),
            "kyberPublicKey": b64(self.identity.kyber_public_key),
            "kyberKeySignature": b64(self.identity.kyber_key_signature),
            "deviceFingerprint": self.profile.vault["fingerprint"],
            **self._signed_challenge(cyphr_id),
        }
        if display_name:
            body["displayName"] = display_name
        answer = self.http.call("POST", "/api/cyphr-id/register", body, auth=False)
        with self.profile.lock:
            self.profile.settings.update(cyphrId=answer["cyphrId"], userId=answer["userId"])
        self._set_session(answer)
        if prekeys:
            self.upload_prekeys(prekeys, progress)
        return answer

    def login(self, totp_code: str | None = None) -> dict[str, Any]:
        body = {"cyphrId": self.cyphr_id, "deviceFingerprint": self.profile.vault["fingerprint"],
                **self._signed_challenge(self.cyphr_id)}
        if totp_code:
            body["totpCode"] = totp_code
        answer = self.http.call("POST", "/api/cyphr-id/login", body, auth=False)
        self._set_session(answer)
        return answer

    @classmethod
    def recover(cls, directory: str | Path, passphrase: str, server: str, phrase: str,
                cyphr_id: str, prekeys: int = PREKEY_BATCH, progress: Progress | None = None,
                **kwargs: Any) -> Client:
        """This identity on a new device: a new profile from the phrase. The
        server rebinds the Cyphr ID to this device and ends the old one's
        sessions."""
        client, _ = cls.init(directory, passphrase, server, phrase, **kwargs)
        body = {"cyphrId": cyphr_id, "newDeviceFingerprint": client.profile.vault["fingerprint"],
                **client._signed_challenge(cyphr_id)}
        answer = client.http.call("POST", "/api/cyphr-id/recover", body, auth=False)
        with client.profile.lock:
            client.profile.settings["cyphrId"] = cyphr_id
        client._set_session(answer)
        # The main ML-KEM key may have been rotated since the phrase was
        # made: find its generation, so that messages sealed to it open here.
        client._adopt_published_generation(answer["user"])
        if prekeys:
            client.upload_prekeys(prekeys, progress)
        return client

    def _adopt_published_generation(self, user: dict[str, Any]) -> None:
        published = user.get("kyberPublicKey")
        for generation in range(0, 1000):
            candidate = self.identity.kem_key_of(generation).public_key().public_bytes_raw()
            if b64(candidate) == published:
                self.identity = Identity(self.identity.seed, generation)
                self._save(generation=generation)
                return
        # Not one of ours (an older client's key): publish our own.
        self.rotate_kyber(to_generation=0)

    def _call(self, method: str, path: str, body: Any = None,
              params: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.http.token is None:
            self.login()
        try:
            return self.http.call(method, path, body, params=params)
        except ApiError as e:
            if e.status != 401 or e.code not in _SESSION_CODES:
                raise
        self.login()  # the session ended: sign in again (TOTP users must do it by hand)
        return self.http.call(method, path, body, params=params)

    def whoami(self) -> dict[str, Any]:
        return self._call("GET", f"/api/cyphr-id/user/{segment(self.cyphr_id)}")["user"]

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
        self._call("DELETE", "/api/cyphr-id/account", self._signed_challenge(self.cyphr_id))
        self.http.token = None
        with self.profile.lock:
            self.profile.settings["deleted"] = True
        self._save(token=None, tokenExpiresAt=None, prekeys={})

    # -- keys -------------------------------------------------------------

    def rotate_kyber(self, to_generation: int | None = None) -> int:
        generation = self.identity.generation + 1 if to_generation is None else to_generation
        rotated = Identity(self.identity.seed, generation)
        self._call("POST", "/api/messaging/store-public-key", {
            "kyberPublicKey": b64(rotated.kyber_public_key),
            "kyberKeySignature": b64(rotated.kyber_key_signature)})
        self.identity = rotated
        self._save(generation=generation)
        return generation

    def upload_prekeys(self, count: int, progress: Progress | None = None) -> int:
        """Make ``count`` one-time prekeys, keep their secrets in the vault,
        and publish them; answers how many the server now holds."""
        total = 0
        made = 0
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
            answer = self._call("POST", "/api/keys/prekeys",
                                {"prekeys": [p.upload_form(self.identity) for p in batch]})
            total = answer["total"]
            made += len(batch)
        return total

    def prekeys_remaining(self) -> int:
        return int(self._call("GET", "/api/keys/count")["remaining"])

    def top_up_prekeys(self, low: int = PREKEY_LOW, target: int = PREKEY_BATCH,
                       progress: Progress | None = None) -> int:
        """Publish more one-time prekeys when fewer than ``low`` are left."""
        remaining = self.prekeys_remaining()
        if remaining >= low:
            return 0
        self.upload_prekeys(target - remaining, progress)
        return target - remaining

    # -- contacts ---------------------------------------------------------

    def contact(self, cyphr_id: str) -> Contact:
        """A user's keys, checked: the Kyber key must be signed by the
        identity key, and the identity key must be the pinned one (pinned on
        first use)."""
        answer = self._call("GET", f"/api/messaging/public-key/{segment(cyphr_id)}")
        identity_key = base64.b64decode(answer["publicKey"])
        kyber_key = base64.b64decode(answer["kyberPublicKey"])
        if not crypto.verify_kyber_key(identity_key, kyber_key,
                                       base64.b64decode(answer["kyberKeySignature"])):
            raise ClientError(f"{cyphr_id}'s ML-KEM key is not signed by its identity key: "
                              f"refusing it")
        pinned = self._pinned(cyphr_id, identity_key)
        return Contact(cyphr_id, identity_key, kyber_key,
                       self.safety_number_with(cyphr_id, identity_key), pinned.get("verified", False))

    def _pinned(self, cyphr_id: str, identity_key: bytes) -> dict[str, Any]:
        with self.profile.lock:
            pins = self.profile.vault.setdefault("pins", {})
            pin = pins.get(cyphr_id)
            if pin is None:
                pin = pins[cyphr_id] = {"identityKey": b64(identity_key), "verified": False}
                self.profile.save()
            elif pin["identityKey"] != b64(identity_key):
                raise IdentityChanged(cyphr_id, self.safety_number_with(cyphr_id, identity_key))
            return pin

    def accept_identity(self, cyphr_id: str) -> Contact:
        """Pin the identity key the server now shows, after the user compared
        the safety number; marks the contact verified."""
        answer = self._call("GET", f"/api/messaging/public-key/{segment(cyphr_id)}")
        identity_key = base64.b64decode(answer["publicKey"])
        with self.profile.lock:
            self.profile.vault.setdefault("pins", {})[cyphr_id] = {
                "identityKey": b64(identity_key), "verified": True}
            self.profile.save()
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
        return self.contact(cyphr_id).identity_key

    def _recipient(self, cyphr_id: str) -> Recipient:
        if cyphr_id == self.cyphr_id:
            return Recipient(cyphr_id, self.identity.public_key, self.identity.kyber_public_key)
        contact = self.contact(cyphr_id)
        if self._claim_paused.get(cyphr_id, 0.0) <= time.monotonic():
            try:
                claim = self._call("POST", f"/api/keys/claim/{segment(cyphr_id)}", {})
            except ApiError as e:
                if e.code != "RATE_LIMITED":
                    raise
                self._claim_paused[cyphr_id] = time.monotonic() + (e.retry_after or 60.0)
            else:
                key = base64.b64decode(claim["kyberPublicKey"])
                # The server hands the key out; only the identity key vouches for it.
                if not crypto.verify_kyber_key(contact.identity_key, key,
                                               base64.b64decode(claim["signature"])):
                    raise ClientError(f"the prekey handed out for {cyphr_id} is not signed by "
                                      f"its identity key: refusing it")
                if claim.get("oneTime"):
                    return Recipient(cyphr_id, contact.identity_key, key, int(claim["keyId"]))
                self._claim_paused[cyphr_id] = time.monotonic() + _CLAIM_PAUSE
        return Recipient(cyphr_id, contact.identity_key, contact.kyber_public_key)

    # -- chats ------------------------------------------------------------

    def chats(self) -> list[dict[str, Any]]:
        chats = self._call("GET", "/api/messaging/chats")["chats"]
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
        of the direct chat with ``to`` (a Cyphr ID), and send it."""
        return self._send(to, text.encode("utf-8"), message_type)

    def _send(self, to: str, plaintext: bytes, message_type: str) -> dict[str, Any]:
        return self._call("POST", "/api/messaging/send", self.sealed(to, plaintext, message_type))

    def sealed(self, to: str, plaintext: bytes, message_type: str = "text") -> dict[str, Any]:
        """The body of a send (REST or ``send_message``): the plaintext
        sealed for every member of the chat ``to`` (a chat id), or of the
        direct chat with ``to`` (a Cyphr ID)."""
        if is_chat_id(to):
            chat_id: str | None = to
            members = [m["cyphrId"] for m in self.members(to)]
            target = {"chatId": to}
        else:
            chat_id = self._direct_chat_with(to)
            members = sorted({self.cyphr_id, to})
            target = {"chatId": chat_id} if chat_id else {"recipientId": to}
        client_message_id = str(uuid.uuid4())
        payload = crypto.seal(self.identity, self.cyphr_id, [self._recipient(m) for m in members],
                              plaintext, chat_id=chat_id, message_type=message_type,
                              client_message_id=client_message_id)
        return {**target, "encryptedPayload": payload, "messageType": message_type,
                "clientMessageId": client_message_id}

    def history(self, chat_id: str, limit: int = 50, before: int | None = None,
                after: int | None = None) -> list[Message]:
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        if after is not None:
            params["after"] = after
        answer = self._call("GET", f"/api/messaging/chat/{segment(chat_id)}", params=params)
        return [self.open_message(m) for m in answer["messages"]]

    def sync(self, since: str | None = None, limit: int = 200) -> tuple[list[Message], str, bool]:
        params: dict[str, Any] = {"limit": limit}
        if since:
            params["since"] = since
        answer = self._call("GET", "/api/messaging/sync", params=params)
        return [self.open_message(m) for m in answer["messages"]], answer["cursor"], answer["hasMore"]

    def open_message(self, message: dict[str, Any]) -> Message:
        """Verify and decrypt one message as the server gave it. Never
        raises for a bad message: the answer's ``error`` says what is wrong."""
        def result(text: str | None, verified: bool, error: str | None = None) -> Message:
            return Message(message.get("id", ""), message.get("chatId", ""), message.get("seq", 0),
                           message.get("senderId", ""), message.get("timestamp", ""),
                           message.get("messageType", ""), text, verified, error,
                           message.get("clientMessageId"))

        payload = message.get("encryptedPayload")
        if message.get("deletedAt") or payload is None:
            return result(None, False, "deleted by its sender")
        try:
            sender_key = self._sender_key(message["senderId"])
            with self.profile.lock:
                vault = self.profile.vault
                content_key = vault.get("contentKeys", {}).get(message["id"])
                prekeys = {int(k): base64.b64decode(v) for k, v in vault.get("prekeys", {}).items()}
            direct_members = None
            if isinstance(payload, dict) and isinstance(payload.get("header"), dict) \
                    and payload["header"].get("chatId") is None:
                chat = self._chat(message["chatId"])
                if chat is not None and chat["chatType"] == "direct":
                    direct_members = frozenset(chat["participants"])
            opened = crypto.open_sealed(
                payload, reader=self.identity, reader_id=self.cyphr_id, sender_key=sender_key,
                envelope=message, prekeys=prekeys, direct_members=direct_members,
                content_key=base64.b64decode(content_key) if content_key else None)
        except (CryptoError, ClientError) as e:
            return result(None, False, str(e))
        if opened.key_id is not None and content_key is None:
            # The one-time prekey has done its work: erase its secret, and
            # keep this message's content key so that it still opens.
            with self.profile.lock:
                self.profile.vault["prekeys"].pop(str(opened.key_id), None)
                self.profile.vault.setdefault("contentKeys", {})[message["id"]] = b64(opened.content_key)
                self.profile.save()
        text = opened.plaintext.decode("utf-8", errors="replace")
        if message.get("messageType") == "system":
            self._system_message(message["chatId"], text)
        return result(text, True)

    # -- groups -----------------------------------------------------------

    def create_group(self, name: str, members: list[str]) -> str:
        """A group chat; its name is encrypted with a fresh name key, which
        goes to the members in a sealed system message."""
        name_key = os.urandom(32)
        answer = self._call("POST", "/api/messaging/create-group", {
            "encryptedName": _seal_name(name_key, name), "members": members})
        chat_id = answer["chatId"]
        with self.profile.lock:
            self.profile.vault.setdefault("groupKeys", {})[chat_id] = b64(name_key)
            self.profile.save()
        self._share_group_key(chat_id)
        return chat_id

    def _share_group_key(self, chat_id: str) -> None:
        with self.profile.lock:
            key = self.profile.vault.get("groupKeys", {}).get(chat_id)
        if key is not None:
            self._send(chat_id, json.dumps({"groupKey": key}).encode("utf-8"), "system")

    def _system_message(self, chat_id: str, text: str) -> None:
        try:
            content = json.loads(text)
        except ValueError:
            return
        if isinstance(content, dict) and isinstance(content.get("groupKey"), str):
            with self.profile.lock:
                keys = self.profile.vault.setdefault("groupKeys", {})
                if keys.get(chat_id) != content["groupKey"]:
                    keys[chat_id] = content["groupKey"]
                    self.profile.save()

    def _group_name(self, chat: dict[str, Any]) -> str | None:
        if chat.get("chatType") != "group":
            others = [p for p in chat.get("participants", []) if p != self.cyphr_id]
            return others[0] if others else self.cyphr_id
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

    def add_member(self, chat_id: str, cyphr_id: str) -> None:
        self._call("POST", f"/api/chats/{segment(chat_id)}/members/{segment(cyphr_id)}", {})
        self._share_group_key(chat_id)

    def remove_member(self, chat_id: str, cyphr_id: str) -> None:
        self._call("DELETE", f"/api/chats/{segment(chat_id)}/members/{segment(cyphr_id)}", {})

    def set_role(self, chat_id: str, cyphr_id: str, role: str) -> None:
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
        """Link the Stellar account of ``stellar_secret``: the secret signs a
        challenge here and never leaves this process."""
        from stellar_sdk import Keypair
        from stellar_sdk.exceptions import Ed25519SecretSeedInvalidError

        try:
            keypair = Keypair.from_secret(stellar_secret.strip())
        except (Ed25519SecretSeedInvalidError, ValueError):
            raise ClientError("not a Stellar secret seed (S...)") from None
        challenge_id, challenge = self._challenge(self.cyphr_id)
        answer = self._call("POST", "/api/wallet/link", {
            "stellarAddress": keypair.public_key, "challengeId": challenge_id,
            "signature": b64(keypair.sign(challenge))})
        return answer["stellarAddress"]

    def wallet_show(self, cyphr_id: str | None = None) -> str:
        return self._call("GET", f"/api/wallet/{segment(cyphr_id or self.cyphr_id)}")["stellarAddress"]

    def wallet_unlink(self) -> None:
        self._call("DELETE", "/api/wallet/link", {})

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
