"""
Writes tests/vectors/signatures-v2.json: the inputs, the exact bytes and
the signatures of every kind of v2 labelled signature, from fixed keys;
tests/vectors/devices-v2.json: a sealed seed (linking a device) and a
sealed device name, from fixed keys and fixed randomness; and
tests/vectors/messages-v3.json: a message sealed per device (v3), likewise;
tests/vectors/sessions-v1.json: a session (cyphr-s1);
tests/vectors/messages-v4.json: a message over sessions (cyphr-s1-message);
tests/vectors/rosters-v1.json: a group roster's chain (cyphr-v2 roster-change); and
tests/vectors/attachments-v1.json: encrypted attachments (cyphr-a1).

    python tools/make_vectors.py [--check]

Every implementation of the v2 scheme (this repository's client and
server, and any other client) must rebuild the same bytes and signatures
from the inputs. Run it only when a new kind is added: the vectors of an
existing kind never change (``--check`` says whether the files are current).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from nacl.signing import SigningKey
from stellar_sdk import Keypair

from cyphr import signing

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "signatures-v2.json"
DEVICES_OUT = OUT.parent / "devices-v2.json"
MESSAGES_OUT = OUT.parent / "messages-v3.json"
SESSIONS_OUT = OUT.parent / "sessions-v1.json"
SESSION_MESSAGES_OUT = OUT.parent / "messages-v4.json"
ROSTERS_OUT = OUT.parent / "rosters-v1.json"
ATTACHMENTS_OUT = OUT.parent / "attachments-v1.json"

# Fixed secrets: the vectors are public test data, never keys of anyone.
ED25519_SEED = bytes(range(32))
STELLAR_SEED = bytes(range(32, 64))
MLKEM_SEED = bytes(range(64, 128))


def _hex(data: bytes) -> str:
    return data.hex()


def build() -> dict[str, Any]:
    key = SigningKey(ED25519_SEED)
    kem_public = MLKEM1024PrivateKey.from_seed_bytes(MLKEM_SEED).public_key().public_bytes_raw()
    vectors: list[dict[str, Any]] = []

    def add(name: str, label: str, inputs: dict[str, Any], content: bytes) -> None:
        to_sign = signing.sign_content(label, content)
        vectors.append({
            "name": name,
            "label": signing.PREFIX + label,
            "inputs": inputs,
            "content": _hex(content),
            "signContent": _hex(to_sign),
            "signature": _hex(key.sign(to_sign).signature),
        })

    challenge = bytes(range(200, 232))
    for purpose, fingerprint in ((signing.LOGIN, "ab" * 32), (signing.REGISTER, "cd" * 32),
                                 (signing.RECOVER, "ef" * 32), (signing.DELETE, "01" * 32)):
        statement = signing.AuthStatement(
            purpose=purpose, origin="https://chat.example.org", cyphr_id="alice_01",
            device=signing.device_hash(fingerprint),
            challenge_id="6f1c1f7e-0d6b-4a4f-9a59-3c1f4f0e2b7d", challenge=challenge)
        add(f"auth-{purpose}", signing.AUTH, {
            "purpose": purpose, "origin": statement.origin, "cyphrId": statement.cyphr_id,
            "deviceFingerprint": fingerprint, "device": _hex(statement.device),
            "challengeId": statement.challenge_id, "challenge": _hex(challenge)},
            statement.encode())

    for one_time, key_id in ((False, 3), (True, 4711)):
        binding = signing.KeyBinding(one_time=one_time, owner="alice_01", key_id=key_id,
                                     created_at=1_790_000_000_000,
                                     expires_at=1_805_552_000_000, public_key=kem_public)
        add("ml-kem-key" if not one_time else "one-time-prekey", binding.label, {
            "algorithm": signing.KEY_ALGORITHM, "owner": binding.owner, "keyId": key_id,
            "createdAt": binding.created_at, "expiresAt": binding.expires_at,
            "publicKey": _hex(kem_public)}, binding.encode())

    header = signing.MessageHeader(
        scheme="cyphr-hybrid-v2", chat_id="0b8e4f8a-54a3-4f5e-a1f7-2f0f5e0c9a11",
        sender_id="alice_01", message_type="text",
        client_message_id="3d2b7c52-8a2e-4f0c-9a9d-5c6e7f8a9b0c",
        recipients=("alice_01", "bob_02"), ephemeral_key=bytes(range(100, 132)))
    keys = [signing.WrappedKey("alice_01", False, 0, bytes([1]) * 1568, bytes([2]) * 24,
                               bytes([3]) * 48),
            signing.WrappedKey("bob_02", True, 17, bytes([4]) * 1568, bytes([5]) * 24,
                               bytes([6]) * 48)]
    nonce, ciphertext, tag = bytes([7]) * 24, b"\x08" * 256, b"\x09" * 16
    add("message", signing.MESSAGE, {
        "header": {"scheme": header.scheme, "chatId": header.chat_id,
                   "senderId": header.sender_id, "messageType": header.message_type,
                   "clientMessageId": header.client_message_id,
                   "recipients": list(header.recipients),
                   "ephemeralKey": _hex(header.ephemeral_key)},
        "headerAad": _hex(header.aad()),
        "nonce": _hex(nonce), "ciphertext": _hex(ciphertext), "tag": _hex(tag),
        "keys": [{"recipientId": k.recipient_id, "oneTime": k.one_time, "keyId": k.key_id,
                  "kyberCiphertext": _hex(k.kyber_ciphertext), "nonce": _hex(k.nonce),
                  "wrappedKey": _hex(k.wrapped_key)} for k in keys]},
        signing.message_content(header, nonce, ciphertext, tag, keys))

    # Two devices of one identity: the device id is signed, so the same key
    # signed for device 1 does not verify as device 2's.
    for device_id, key_id in ((1, 0), (2, 3)):
        device = signing.DeviceKeyBinding(owner="alice_01", device_id=device_id, key_id=key_id,
                                          created_at=1_790_000_000_000,
                                          expires_at=1_805_552_000_000, public_key=kem_public)
        add(f"device-key-{device_id}", device.label, {
            "algorithm": signing.KEY_ALGORITHM, "owner": device.owner, "deviceId": device_id,
            "keyId": key_id, "createdAt": device.created_at, "expiresAt": device.expires_at,
            "publicKey": _hex(kem_public)}, device.encode())

    # A message sealed per device (v3): the header lists devices, and each
    # wrapped key names (and the signature covers) the device it is for.
    device_header = signing.DeviceMessageHeader(
        scheme="cyphr-hybrid-v3", chat_id="0b8e4f8a-54a3-4f5e-a1f7-2f0f5e0c9a11",
        sender_id="alice_01", message_type="text",
        client_message_id="5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b",
        recipients=(("alice_01", 1), ("alice_01", 2), ("bob_02", 1)),
        ephemeral_key=bytes(range(132, 164)))
    device_keys = [
        signing.DeviceWrappedKey("alice_01", 1, False, 0, bytes([1]) * 1568, bytes([2]) * 24,
                                 bytes([3]) * 48),
        signing.DeviceWrappedKey("alice_01", 2, True, 5, bytes([4]) * 1568, bytes([5]) * 24,
                                 bytes([6]) * 48),
        signing.DeviceWrappedKey("bob_02", 1, True, 17, bytes([10]) * 1568, bytes([11]) * 24,
                                 bytes([12]) * 48)]
    add("message-v3", signing.MESSAGE, {
        "header": {"scheme": device_header.scheme, "chatId": device_header.chat_id,
                   "senderId": device_header.sender_id,
                   "messageType": device_header.message_type,
                   "clientMessageId": device_header.client_message_id,
                   "recipients": [{"cyphrId": c, "deviceId": d}
                                  for c, d in device_header.recipients],
                   "ephemeralKey": _hex(device_header.ephemeral_key)},
        "headerAad": _hex(device_header.aad()),
        "nonce": _hex(nonce), "ciphertext": _hex(ciphertext), "tag": _hex(tag),
        "keys": [{"recipientId": k.recipient_id, "deviceId": k.device_id,
                  "oneTime": k.one_time, "keyId": k.key_id,
                  "kyberCiphertext": _hex(k.kyber_ciphertext), "nonce": _hex(k.nonce),
                  "wrappedKey": _hex(k.wrapped_key)} for k in device_keys]},
        signing.message_content(device_header, nonce, ciphertext, tag, device_keys))

    # Session keys (cyphr.client.sessions): the identity's X25519 key, and
    # a device's signed X25519 prekey and last-resort ML-KEM prekey.
    dh_public = bytes(range(164, 196))
    add("identity-dh", signing.IDENTITY_DH, {"owner": "alice_01", "publicKey": _hex(dh_public)},
        signing.identity_dh_content("alice_01", dh_public))
    for name, kind, public in (("dh-prekey", signing.DH_SIGNED_PREKEY, dh_public),
                               ("kem-prekey", signing.KEM_LAST_RESORT_PREKEY, kem_public)):
        prekey = signing.SessionPrekeyBinding(kind, "alice_01", 2, 9, 1_790_000_000_000,
                                              1_792_592_000_000, public)
        add(name, prekey.label, {
            "kind": kind, "owner": prekey.owner, "deviceId": prekey.device_id,
            "keyId": prekey.key_id, "createdAt": prekey.created_at,
            "expiresAt": prekey.expires_at, "publicKey": _hex(public)}, prekey.encode())

    stellar = Keypair.from_raw_ed25519_seed(STELLAR_SEED)
    text = signing.wallet_link_text("https://chat.example.org", "alice_01", stellar.public_key,
                                    "6f1c1f7e-0d6b-4a4f-9a59-3c1f4f0e2b7d", challenge)
    wallet = {
        "name": "wallet-link",
        "label": signing.PREFIX + signing.WALLET_LINK,
        "inputs": {"origin": "https://chat.example.org", "cyphrId": "alice_01",
                   "stellarAddress": stellar.public_key,
                   "challengeId": "6f1c1f7e-0d6b-4a4f-9a59-3c1f4f0e2b7d",
                   "challenge": _hex(challenge)},
        "text": text,
        "sep53Digest": _hex(signing.sep53_digest(text.encode("utf-8"))),
        "signature": _hex(stellar.sign_message(text)),
    }
    return {
        "description": "Cyphr v2 labelled signatures: rebuild 'content' and 'signContent' "
                       "from 'inputs', then check 'signature' (Ed25519, deterministic) by the "
                       "key of ed25519Seed. The wallet link is a SEP-53 signed message by the "
                       "Stellar key of stellarSeed. docs/encryption.rst specifies the layouts.",
        "ed25519Seed": _hex(ED25519_SEED),
        "ed25519PublicKey": _hex(bytes(key.verify_key)),
        "mlKemSeed": _hex(MLKEM_SEED),
        "stellarSeed": _hex(STELLAR_SEED),
        "vectors": vectors,
        "walletLink": wallet,
        "mlKemPublicKeySha256": _hex(hashlib.sha256(kem_public).digest()),
    }


def build_devices() -> dict[str, Any]:
    """The sealed seed and the sealed device name. ML-KEM encapsulation is
    randomized, and OpenSSL takes no randomness from the caller: kyber-py's
    ``_encaps_internal`` (FIPS 203 ML-KEM.Encaps_internal) encapsulates
    with the fixed message ``m`` instead; OpenSSL decapsulates it when the
    tests open the vector."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from kyber_py.ml_kem import ML_KEM_1024

    from cyphr.client import devicecrypto

    identity_seed = bytes(range(128, 192))
    x25519_private = bytes(range(192, 224))
    mlkem_seed = bytes(range(64, 128))
    approver_private = bytes(range(224, 256))
    m = bytes([0x5a]) * 32
    nonce = bytes([0x6b]) * 24
    provisioning_id = "1c9f0a52-7d1e-4b8a-9f3c-2e5d6a7b8c9d"
    cyphr_id = "alice_01"
    x25519 = X25519PrivateKey.from_private_bytes(x25519_private)
    mlkem = MLKEM1024PrivateKey.from_seed_bytes(mlkem_seed)
    ephemeral_key = (x25519.public_key().public_bytes_raw()
                     + mlkem.public_key().public_bytes_raw())
    kem_secret, kyber_ciphertext = ML_KEM_1024._encaps_internal(ephemeral_key[32:], m)
    approver = X25519PrivateKey.from_private_bytes(approver_private)
    approver_key = approver.public_key().public_bytes_raw()
    content = devicecrypto.LinkSeed(identity_seed, 2, {
        "0b8e4f8a-54a3-4f5e-a1f7-2f0f5e0c9a11": bytes([0x11]) * 32,
        "7f3e2d1c-0b9a-4887-a665-544332211000": bytes([0x22]) * 32})
    sealed = devicecrypto.seal_link_seed_with(
        content, ephemeral_key, provisioning_id, cyphr_id, approver=approver,
        kem_secret=kem_secret, kyber_ciphertext=kyber_ciphertext, nonce=nonce)
    header = devicecrypto.link_seed_header(provisioning_id, cyphr_id, ephemeral_key,
                                           approver_key, kyber_ciphertext)
    dh_secret = approver.exchange(x25519.public_key())
    link_seed = {
        "label": devicecrypto.LINK_SEED_LABEL,
        "inputs": {
            "provisioningId": provisioning_id, "cyphrId": cyphr_id,
            "identitySeed": _hex(identity_seed), "generation": content.generation,
            "groupKeys": {chat: _hex(key) for chat, key in sorted(content.group_keys.items())},
            "ephemeralX25519Private": _hex(x25519_private),
            "ephemeralMlKemSeed": _hex(mlkem_seed),
            "approverX25519Private": _hex(approver_private),
            "encapsulationM": _hex(m), "nonce": _hex(nonce)},
        "ephemeralKey": _hex(ephemeral_key),
        "linkFingerprint": devicecrypto.link_fingerprint(ephemeral_key),
        "approverKey": _hex(approver_key),
        "kyberCiphertext": _hex(kyber_ciphertext),
        "kemSecret": _hex(kem_secret),
        "dhSecret": _hex(dh_secret),
        "header": _hex(header),
        "key": _hex(devicecrypto.link_seed_key(kem_secret, dh_secret, header)),
        "plaintext": _hex(content.encode()),
        "sealed": _hex(sealed),
    }
    name_nonce = bytes([0x7c]) * 24
    name = "Alice's laptop"
    device_name = {
        "label": devicecrypto.DEVICE_NAME_LABEL,
        "inputs": {"identitySeed": _hex(identity_seed), "cyphrId": cyphr_id, "deviceId": 2,
                   "name": name, "nonce": _hex(name_nonce)},
        "key": _hex(devicecrypto.device_name_key(identity_seed)),
        "aad": _hex(devicecrypto.device_name_aad(cyphr_id, 2)),
        "sealed": _hex(devicecrypto.seal_device_name_with(identity_seed, cyphr_id, 2, name,
                                                          name_nonce)),
    }
    return {
        "description": "Cyphr v2 devices: a sealed seed (linking a device) and a sealed device "
                       "name, from the fixed keys and randomness of 'inputs'. docs/encryption.rst "
                       "('The sealed seed', 'Device names') specifies the layouts.",
        "linkSeed": link_seed,
        "deviceName": device_name,
    }


def build_messages() -> dict[str, Any]:
    """A message sealed per device (v3) to three devices: the sender's own
    device 1 (the identity's main key), its linked device 2 (a device key)
    and bob's device 1 (a one-time prekey). Encapsulations use kyber-py's
    ``_encaps_internal`` with fixed messages ``m``, as build_devices does."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from kyber_py.ml_kem import ML_KEM_1024

    from cyphr.client import crypto

    alice_seed, bob_seed = bytes(range(64)), bytes(range(64, 128))
    device_key_seed, prekey_seed = bytes(range(128, 192)), bytes(range(192, 256))
    ephemeral_private = bytes([0x21]) * 32
    content_key, nonce = bytes([0x32]) * 32, bytes([0x43]) * 24
    alice, bob = crypto.Identity(alice_seed), crypto.Identity(bob_seed)
    device_key = MLKEM1024PrivateKey.from_seed_bytes(device_key_seed)
    prekey = MLKEM1024PrivateKey.from_seed_bytes(prekey_seed)
    recipients = [
        crypto.DeviceRecipient("alice_01", 1, alice.public_key, alice.kyber_public_key, 0),
        crypto.DeviceRecipient("alice_01", 2, alice.public_key,
                               device_key.public_key().public_bytes_raw(), 3),
        crypto.DeviceRecipient("bob_02", 1, bob.public_key,
                               prekey.public_key().public_bytes_raw(), 17, True)]
    ms = [bytes([0x50 + i]) * 32 for i in range(len(recipients))]
    wrap_nonces = [bytes([0x60 + i]) * 24 for i in range(len(recipients))]
    secrets: list[tuple[bytes, bytes]] = []

    def encapsulate(public_key: bytes) -> tuple[bytes, bytes]:
        secrets.append(ML_KEM_1024._encaps_internal(public_key, ms[len(secrets)]))
        return secrets[-1]

    nonces = iter(wrap_nonces)
    plaintext = "to every device ☃".encode("utf-8")
    payload = crypto.seal_to_devices_with(
        alice, "alice_01", 1, recipients, plaintext,
        chat_id="0b8e4f8a-54a3-4f5e-a1f7-2f0f5e0c9a11", message_type="text",
        client_message_id="5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b",
        ephemeral=X25519PrivateKey.from_private_bytes(ephemeral_private),
        content_key=content_key, nonce=nonce, encapsulate=encapsulate,
        wrap_nonce=lambda: next(nonces))
    parsed = crypto._parse_v3(payload)
    aad = parsed.header.aad()
    ephemeral = X25519PrivateKey.from_private_bytes(ephemeral_private)
    entries = []
    for r, (kem_secret, kyber_ciphertext) in zip(recipients, secrets):
        their_x25519 = crypto.identity_x25519(r.identity_key)
        dh_secret = ephemeral.exchange(X25519PublicKey.from_public_bytes(their_x25519))
        entries.append({
            "cyphrId": r.cyphr_id, "deviceId": r.device_id, "recipientX25519": _hex(their_x25519),
            "kemSecret": _hex(kem_secret), "dhSecret": _hex(dh_secret),
            "wrapKey": _hex(crypto._device_wrap_key(
                kem_secret, dh_secret, aad, r.cyphr_id, r.device_id, kyber_ciphertext,
                parsed.header.ephemeral_key, their_x25519)),
            "wrapAad": _hex(crypto._device_wrap_aad(aad, r.cyphr_id, r.device_id))})
    return {
        "description": "Cyphr v3 (cyphr-hybrid-v3): a message sealed per device, from the fixed "
                       "keys and randomness of 'inputs'; docs/encryption.rst ('Sealing per "
                       "device') specifies the steps. Rebuild 'payload' exactly, then open it "
                       "as each device.",
        "inputs": {
            "senderSeed": _hex(alice_seed), "bobSeed": _hex(bob_seed),
            "alice2DeviceKeySeed": _hex(device_key_seed), "bobPrekeySeed": _hex(prekey_seed),
            "recipients": [{"cyphrId": r.cyphr_id, "deviceId": r.device_id, "keyId": r.key_id,
                            "oneTime": r.one_time} for r in recipients],
            "ephemeralX25519Private": _hex(ephemeral_private), "contentKey": _hex(content_key),
            "nonce": _hex(nonce), "encapsulationM": [_hex(m) for m in ms],
            "wrapNonces": [_hex(n) for n in wrap_nonces], "plaintext": _hex(plaintext),
            "chatId": "0b8e4f8a-54a3-4f5e-a1f7-2f0f5e0c9a11", "senderId": "alice_01",
            "senderDevice": 1, "messageType": "text",
            "clientMessageId": "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"},
        "headerAad": _hex(aad),
        "paddedPlaintext": _hex(crypto.pad(plaintext)),
        "entries": entries,
        "payload": payload,
    }


def _fixed_draws(label: bytes, first_m: int) -> tuple[Callable[[int], bytes],
                                                     Callable[[bytes], tuple[bytes, bytes]],
                                                     list[dict[str, str]], list[dict[str, str]]]:
    """Randomness and ML-KEM encapsulations fixed for vectors: ``random(n)``
    gives SHA-256(label || " " || counter) doubled, cut to n; the k-th
    encapsulation uses m = byte (first_m + k) repeated 32 times (kyber-py's
    ``_encaps_internal``). Each draw and encapsulation is recorded for the
    vector file."""
    from kyber_py.ml_kem import ML_KEM_1024

    draws: list[dict[str, str]] = []
    counter = iter(range(1, 1000))

    def random(n: int) -> bytes:
        value = hashlib.sha256(label + b" %d" % next(counter)).digest() * 2
        draws.append({"bytes": _hex(value[:n])})
        return value[:n]

    ms = [bytes([first_m + i]) * 32 for i in range(8)]
    encapsulations: list[dict[str, str]] = []

    def encapsulate(public_key: bytes) -> tuple[bytes, bytes]:
        m = ms[len(encapsulations)]
        secret, ciphertext = ML_KEM_1024._encaps_internal(public_key, m)
        encapsulations.append({"m": _hex(m), "publicKeySha256": _hex(
            hashlib.sha256(public_key).digest()), "sharedSecret": _hex(secret)})
        return secret, ciphertext

    return random, encapsulate, draws, encapsulations


def build_sessions() -> dict[str, Any]:
    """A session (cyphr-s1) from fixed keys and randomness: alice's device 1
    starts one with bob's device 2 from his bundle (PQXDH), then four
    messages go back and forth, with an ML-KEM re-keying on each new
    sending chain of a side that sent since its last. Every random draw is listed, in the order the code
    makes it; encapsulations use kyber-py's ``_encaps_internal`` with the
    fixed messages ``m``, in order."""
    from cyphr.client import crypto, sessions

    now = 1_790_000_000_000
    alice, bob = crypto.Identity(bytes(range(64))), crypto.Identity(bytes(range(64, 128)))
    parties = {}
    for name, identity, device in (("alice_01", alice, 1), ("bob_02", bob, 2)):
        private = sessions.identity_dh_private(identity.seed)
        public = sessions._public(private)
        parties[name] = sessions.Me(
            sessions.Party(name, device, identity.public_key, public), private,
            sessions.sign_identity_dh(identity.signing_key, name, public))
    spk, opk = bytes([0x71]) * 32, bytes([0x72]) * 32
    pqspk_seed = bytes([0x73]) * 64

    def prekey(kind: int, key_id: int, public: bytes) -> sessions.Prekey:
        return sessions.Prekey(kind, "bob_02", 2, key_id, now - 86_400_000,
                               now + 30 * 86_400_000, public).signed(bob.signing_key)

    bundle = sessions.Bundle(
        "bob_02", 2, parties["bob_02"].party.identity_dh,
        parties["bob_02"].identity_dh_signature,
        prekey(sessions.DH_SIGNED, 1, sessions._public(spk)),
        prekey(sessions.KEM_LAST_RESORT, 2, sessions._kem_public(pqspk_seed)),
        prekey(sessions.DH_ONE_TIME, 3, sessions._public(opk)))
    random, encapsulate, draws, encapsulations = _fixed_draws(b"cyphr-s1 vectors", 0x80)

    ephemeral = bytes([0x74]) * 32
    policy = sessions.Policy(rekey_messages=1)
    mine, handshake = sessions.initiate(parties["alice_01"], bundle, bob.public_key, now,
                                        ephemeral=ephemeral, encapsulate_with=encapsulate,
                                        random=random, policy=policy)
    ek = sessions._x25519(ephemeral)
    ik = sessions._x25519(parties["alice_01"].identity_dh_private)
    spk_public = bundle.signed_prekey.public_key
    dh = [sessions._dh(ik, spk_public), sessions._dh(ek, bundle.identity_dh),
          sessions._dh(ek, spk_public), sessions._dh(ek, sessions._public(opk))]
    shared_key = sessions._shared_key(dh, bytes.fromhex(encapsulations[0]["sharedSecret"]))
    messages = [{"from": "alice_01", "plaintext": _hex(b"hello bob"),
                 "message": _hex(mine.encrypt(b"hello bob", now))}]
    theirs = sessions.respond(parties["bob_02"], handshake, alice.public_key,
                              sessions.PrekeySecrets(spk, pqspk_seed, opk), now,
                              encapsulate_with=encapsulate, random=random, policy=policy)
    assert theirs.decrypt(bytes.fromhex(messages[0]["message"]), now) == b"hello bob"
    for sender, receiver, name, text in ((theirs, mine, "bob_02", "hello alice"),
                                         (mine, theirs, "alice_01", "how are you?"),
                                         (theirs, mine, "bob_02", "fine ☃")):
        message = sender.encrypt(text.encode("utf-8"), now)
        assert receiver.decrypt(message, now) == text.encode("utf-8")
        messages.append({"from": name, "plaintext": _hex(text.encode("utf-8")),
                         "message": _hex(message)})
    return {
        "description": "Cyphr sessions (cyphr-s1): the PQXDH handshake from alice_01's device "
                       "1 to bob_02's device 2 and four Double Ratchet messages, re-keyed with "
                       "ML-KEM on each new sending chain of a side that sent a message since "
                       "its last re-keying (rekeyMessages 1). Identities come "
                       "from their seeds as crypto.Identity derives them; 'randomDraws' are "
                       "every random value the code takes, in order; 'encapsulations' every "
                       "ML-KEM encapsulation, in order (FIPS 203 ML-KEM.Encaps_internal with "
                       "'m'). docs/encryption.rst ('Sessions') specifies the steps. Rebuild "
                       "'bundle', 'handshake', 'sharedKey' and each message exactly; then "
                       "open each message as its receiver.",
        "inputs": {
            "now": now, "aliceSeed": _hex(alice.seed), "bobSeed": _hex(bob.seed),
            "bobSignedPrekeyPrivate": _hex(spk), "bobLastResortKemSeed": _hex(pqspk_seed),
            "bobOneTimePrekeyPrivate": _hex(opk), "aliceEphemeralPrivate": _hex(ephemeral),
            "rekeyMessages": 1,
        },
        "aliceIdentityDh": _hex(parties["alice_01"].party.identity_dh),
        "bobIdentityDh": _hex(parties["bob_02"].party.identity_dh),
        "bundle": {
            "identityDhSignature": _hex(bundle.identity_dh_signature),
            "prekeys": [{"kind": p.kind, "keyId": p.key_id, "createdAt": p.created_at,
                         "expiresAt": p.expires_at, "publicKey": _hex(p.public_key),
                         "signature": _hex(p.signature)}
                        for p in (bundle.signed_prekey, bundle.kem_prekey,
                                  bundle.one_time_prekey)]},
        "dhOutputs": [_hex(d) for d in dh],
        "sharedKey": _hex(shared_key),
        "associatedData": _hex(mine.ad),
        "handshake": _hex(handshake.encode()),
        "randomDraws": draws,
        "encapsulations": encapsulations,
        "messages": messages,
    }


def build_session_messages() -> dict[str, Any]:
    """A message over sessions (cyphr-s1-message, version 4) from alice_01's
    device 1 to two devices: her device 2, over a session already answered
    (kind "message"), and bob_02's device 2, over a session started for it
    (kind "prekey": the envelope carries the handshake). Both open it.
    Every random draw is listed in the order the code makes it (the
    sessions', then the content key, then the readers'); encapsulations
    use kyber-py's ``_encaps_internal`` with the fixed messages ``m``."""
    from cyphr.client import crypto, sessionmessages, sessions

    now = 1_790_000_000_000
    alice, bob = crypto.Identity(bytes(range(64))), crypto.Identity(bytes(range(64, 128)))
    me = {}
    for name, identity, device in (("alice_01", alice, 1), ("alice_01", alice, 2),
                                   ("bob_02", bob, 2)):
        private = sessions.identity_dh_private(identity.seed)
        public = sessions._public(private)
        me[(name, device)] = sessions.Me(
            sessions.Party(name, device, identity.public_key, public), private,
            sessions.sign_identity_dh(identity.signing_key, name, public))
    # Each receiving device's signed, last-resort ML-KEM and one-time prekeys.
    secrets = {("alice_01", 2): (bytes([0x91]) * 32, bytes([0x92]) * 64, bytes([0x93]) * 32),
               ("bob_02", 2): (bytes([0xa1]) * 32, bytes([0xa2]) * 64, bytes([0xa3]) * 32)}
    ephemerals = {("alice_01", 2): bytes([0x94]) * 32, ("bob_02", 2): bytes([0xa4]) * 32}

    def bundle(owner: str, device: int, identity: crypto.Identity) -> sessions.Bundle:
        spk, pqspk_seed, opk = secrets[(owner, device)]

        def prekey(kind: int, key_id: int, public: bytes) -> sessions.Prekey:
            return sessions.Prekey(kind, owner, device, key_id, now - 86_400_000,
                                   now + 30 * 86_400_000, public).signed(identity.signing_key)

        party = me[(owner, device)]
        return sessions.Bundle(owner, device, party.party.identity_dh,
                               party.identity_dh_signature,
                               prekey(sessions.DH_SIGNED, 1, sessions._public(spk)),
                               prekey(sessions.KEM_LAST_RESORT, 2,
                                      sessions._kem_public(pqspk_seed)),
                               prekey(sessions.DH_ONE_TIME, 3, sessions._public(opk)))

    random, encapsulate, draws, encapsulations = _fixed_draws(b"cyphr-s1-message vectors", 0xb0)

    options: dict[str, Any] = {"random": random, "encapsulate_with": encapsulate}
    # alice's devices 1 and 2 have a session already: 1 started it, 2 answered.
    to_alice2, handshake = sessions.initiate(
        me[("alice_01", 1)], bundle("alice_01", 2, alice), alice.public_key, now,
        ephemeral=ephemerals[("alice_01", 2)], **options)
    setup = [("alice_01/1", b"hello, my other device", to_alice2.encrypt(
        b"hello, my other device", now))]
    alice2 = sessions.respond(me[("alice_01", 2)], handshake, alice.public_key,
                              sessions.PrekeySecrets(*secrets[("alice_01", 2)]), now, **options)
    assert alice2.decrypt(setup[0][2], now) == setup[0][1]
    setup.append(("alice_01/2", b"hello back", alice2.encrypt(b"hello back", now)))
    assert to_alice2.decrypt(setup[1][2], now) == setup[1][1]
    # bob's device 2 has none: alice's device 1 starts one from his bundle.
    to_bob2, to_bob_handshake = sessions.initiate(
        me[("alice_01", 1)], bundle("bob_02", 2, bob), bob.public_key, now,
        ephemeral=ephemerals[("bob_02", 2)], **options)
    header = sessionmessages.BodyHeader(
        chat_id="0b8e4f8a-54a3-4f5e-a1f7-2f0f5e0c9a11", sender_id="alice_01",
        sender_device_id=1, message_type="text",
        client_message_id="7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d", counter=7, sent_at=now)
    plaintext = "to every device, once ☃".encode("utf-8")
    sealed = sessionmessages.seal(plaintext, header, [
        sessionmessages.Recipient(to_alice2, handshake),
        sessionmessages.Recipient(to_bob2, to_bob_handshake)], random=random)
    content_key, digest = sessionmessages.read_envelope_plaintext(sealed.reopen_key)
    encoded = sealed.header.encode()
    body_key, body_nonce = sessionmessages.body_key(content_key)
    bob2 = sessions.respond(me[("bob_02", 2)], to_bob_handshake, alice.public_key,
                            sessions.PrekeySecrets(*secrets[("bob_02", 2)]), now, **options)
    envelopes = []
    for entry in sealed.envelopes:
        reader = alice2 if entry["cyphrId"] == "alice_01" else bob2
        message = {"encryptedPayload": sealed.payload, "senderId": "alice_01",
                   "senderDeviceId": 1, "chatId": header.chat_id, "messageType": "text",
                   "clientMessageId": header.client_message_id,
                   "envelope": {"kind": entry["kind"], "envelope": entry["envelope"]}}
        assert sessionmessages.open_message(message, reader, now).plaintext == plaintext
        data = base64.b64decode(entry["envelope"])
        envelopes.append({"cyphrId": entry["cyphrId"], "deviceId": entry["deviceId"],
                          "kind": entry["kind"],
                          "sessionMessage": _hex(sessionmessages.decode_envelope(data)[2]),
                          "envelope": _hex(data)})
    return {
        "description": "Cyphr messages over sessions (cyphr-s1-message, version 4): alice_01's "
                       "device 1 sends one message to her device 2, over a session it started "
                       "and device 2 answered ('setup'), and to bob_02's device 2, over a "
                       "session it starts for it (kind 'prekey': the envelope carries the "
                       "handshake). Identities come from their seeds as crypto.Identity derives "
                       "them; bundles are signed as in sessions-v1.json; 'randomDraws' are "
                       "every random value the code takes, in order (the content key is the "
                       "one after bob's session starts); 'encapsulations' every ML-KEM "
                       "encapsulation (FIPS 203 ML-KEM.Encaps_internal with 'm'). "
                       "docs/encryption.rst ('Messages over sessions') specifies the steps. "
                       "Rebuild 'headerBytes', 'keyCommitment', 'bodyKey', 'bodyNonce', "
                       "'ciphertext', 'digest', 'envelopePlaintext', 'payload' and each "
                       "envelope exactly; then open the payload as each device.",
        "inputs": {
            "now": now, "aliceSeed": _hex(alice.seed), "bobSeed": _hex(bob.seed),
            "prekeys": [{"cyphrId": owner, "deviceId": device,
                         "signedPrekeyPrivate": _hex(spk), "lastResortKemSeed": _hex(kem),
                         "oneTimePrekeyPrivate": _hex(opk),
                         "senderEphemeralPrivate": _hex(ephemerals[(owner, device)])}
                        for (owner, device), (spk, kem, opk) in secrets.items()],
            "plaintext": _hex(plaintext), "header": {
                k: v for k, v in header.to_json().items() if k != "keyCommitment"},
        },
        "randomDraws": draws,
        "encapsulations": encapsulations,
        "setup": {"handshake": _hex(handshake.encode()),
                  "messages": [{"from": who, "plaintext": _hex(text), "message": _hex(made)}
                               for who, text, made in setup]},
        "handshakeToBob": _hex(to_bob_handshake.encode()),
        "contentKey": _hex(content_key),
        "keyCommitment": _hex(sealed.header.key_commitment),
        "headerBytes": _hex(encoded),
        "bodyKey": _hex(body_key),
        "bodyNonce": _hex(body_nonce),
        "paddedPlaintext": _hex(crypto.pad(plaintext)),
        "ciphertext": _hex(base64.b64decode(sealed.payload["ciphertext"])),
        "digest": _hex(digest),
        "envelopePlaintext": _hex(sealed.reopen_key),
        "payload": sealed.payload,
        "envelopes": envelopes,
        "sendEnvelopes": sealed.envelopes,
    }


def build_rosters() -> dict[str, Any]:
    """A group roster's chain (cyphr.rosters): alice_01's genesis with
    bob_02 and carol_03, alice making bob an admin and adding dave_04, then
    bob removing carol with a new name key. Each identity signs with the
    Ed25519 key of its seed (alice's is ed25519Seed, 00 01 .. 1f)."""
    from cyphr import rosters

    chat = "0b8e4f8a-54a3-4f5e-a1f7-2f0f5e0c9a11"
    seeds = {"alice_01": ED25519_SEED, "bob_02": bytes(range(128, 160))}
    keys = {name: SigningKey(seed) for name, seed in seeds.items()}
    name_keys = {1: bytes([0x4b]) * 32, 3: bytes([0x4c]) * 32}
    now = 1_790_000_000_000
    first = rosters.genesis(chat, "alice_01", {"bob_02": rosters.MEMBER,
                                               "carol_03": rosters.MEMBER},
                            rosters.name_key_commitment(chat, 1, name_keys[1]), now)
    entries = []
    state = None
    for make in (
            lambda state: first,
            lambda state: rosters.next_change(
                state, "alice_01", [rosters.set_role("bob_02", rosters.ADMIN),
                                    rosters.add("dave_04")], None, now + 60_000),
            lambda state: rosters.next_change(
                state, "bob_02", [rosters.remove("carol_03")],
                rosters.name_key_commitment(chat, 3, name_keys[3]), now + 120_000)):
        change = make(state)
        signature = change.sign(keys[change.author])
        state = rosters.apply(state, change, signature,
                              lambda who: bytes(keys[who].verify_key) if who in keys else None)
        commitment = change.name_key_commitment
        entries.append({
            "inputs": {
                "chatId": change.chat_id, "epoch": change.epoch,
                "previousHash": _hex(change.previous_hash), "author": change.author,
                "createdAt": change.created_at,
                "operations": [{"op": {rosters.ADD: "add", rosters.REMOVE: "remove",
                                       rosters.SET_ROLE: "setRole"}[op.kind],
                                "cyphrId": op.cyphr_id, "role": op.role}
                               for op in change.operations],
                "nameKeyCommitment": None if commitment is None else _hex(commitment)},
            "content": _hex(change.content()),
            "signContent": _hex(signing.sign_content(signing.ROSTER, change.content())),
            "signature": _hex(signature),
            "signedChange": _hex(rosters.SignedChange(change, signature).encode()),
            "state": {"members": dict(state.members), "nameKeyEpoch": state.name_key_epoch,
                      "encoding": _hex(state.encode()), "hash": _hex(state.state_hash()),
                      "nameAad": _hex(rosters.name_aad(state))},
        })
    return {
        "description": "Cyphr group rosters (cyphr-v2 roster-change): a chain of a genesis and "
                       "two changes of one chat. Rebuild each change's 'content' from "
                       "'inputs', its 'signContent' and 'signedChange', and check 'signature' "
                       "(Ed25519, deterministic) by its author's key; apply the chain and "
                       "rebuild each state's 'encoding', 'hash' (the rosterHash of a message "
                       "header at that epoch) and 'nameAad'; rebuild each name key's "
                       "commitment. docs/encryption.rst ('Group rosters') specifies the "
                       "layouts and the rules.",
        "identities": [{"cyphrId": name, "ed25519Seed": _hex(seed),
                        "ed25519PublicKey": _hex(bytes(keys[name].verify_key))}
                       for name, seed in seeds.items()],
        "nameKeys": [{"chatId": chat, "epoch": epoch, "key": _hex(key),
                      "commitment": _hex(rosters.name_key_commitment(chat, epoch, key))}
                     for epoch, key in name_keys.items()],
        "changes": entries,
    }


def build_attachments() -> dict[str, Any]:
    """Attachments (cyphr-a1, cyphr.client.attachcrypto) under one fixed
    key and nonce prefix: an empty file, a short text, one just over the
    smallest bucket and one just over a chunk (two chunks), with every
    chunk's nonce, and a pointer to the short text."""
    from cyphr.client import attachcrypto

    key = bytes(range(0x40, 0x60))
    prefix = bytes(range(0x60, 0x70))
    files = [("empty", b""), ("short text", b"a photo, in spirit"),
             ("over the smallest bucket", bytes(i % 251 for i in range(1025))),
             ("over one chunk", bytes(i % 251 for i in range(attachcrypto.CHUNK_BYTES + 1)))]
    vectors = []
    for name, plaintext in files:
        size = len(plaintext)
        encryptor = attachcrypto.Encryptor(key, size, nonce_prefix=prefix)
        blob = encryptor.update(plaintext) + encryptor.finish()
        padded = attachcrypto.padded_size(size)
        count = attachcrypto.chunk_count(padded)
        vectors.append({
            "name": name, "size": size, "plaintext": _hex(plaintext), "paddedSize": padded,
            "associatedData": _hex(attachcrypto.associated_data(size)),
            "chunks": [{"nonce": _hex(attachcrypto.chunk_nonce(prefix, i, i == count - 1)),
                        "plaintextBytes": min(attachcrypto.CHUNK_BYTES,
                                              padded - i * attachcrypto.CHUNK_BYTES)}
                       for i in range(count)],
            "blobSize": len(blob), "blob": _hex(blob), "digest": _hex(encryptor.digest)})
    short = vectors[1]
    pointer = attachcrypto.Pointer(
        "att_0b8e4f8a54a3", key, bytes.fromhex(short["digest"]), short["size"], "text/plain",
        "spirit.txt")
    return {
        "description": "Cyphr attachments (cyphr-a1, format 1): each file encrypted under "
                       "'key' with the nonce prefix 'noncePrefix' (random in use), padded with "
                       "zeros to 'paddedSize', in chunks of 'chunkBytes' of plaintext, each "
                       "XChaCha20-Poly1305 under its nonce and the file's 'associatedData'; "
                       "'blob' is the version byte, the prefix and the chunks, 'digest' its "
                       "SHA-256. docs/encryption.rst ('Attachments') specifies the layout. "
                       "Rebuild each 'blob' and 'digest' from 'plaintext', and decrypt each "
                       "'blob' back to it; 'pointer' is the short text's pointer JSON.",
        "label": attachcrypto.LABEL,
        "chunkBytes": attachcrypto.CHUNK_BYTES,
        "key": _hex(key),
        "noncePrefix": _hex(prefix),
        "files": vectors,
        "pointer": pointer.to_json(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--check", action="store_true", help="only say whether the file is current")
    args = parser.parse_args()
    status = 0
    for out, made in ((OUT, build()), (DEVICES_OUT, build_devices()),
                      (MESSAGES_OUT, build_messages()), (SESSIONS_OUT, build_sessions()),
                      (SESSION_MESSAGES_OUT, build_session_messages()),
                      (ROSTERS_OUT, build_rosters()),
                      (ATTACHMENTS_OUT, build_attachments())):
        text = json.dumps(made, indent=1) + "\n"
        if args.check:
            current = out.exists() and out.read_text("utf-8") == text
            print(f"{out.name}: current" if current else f"{out} differs from what the code makes")
            status = status if current else 1
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, "utf-8")
        print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
