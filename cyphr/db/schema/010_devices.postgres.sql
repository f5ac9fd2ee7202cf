-- Several devices per identity (docs/encryption.rst, "Devices"). Each
-- device has its own ML-KEM-1024 key, signed by the identity key, its own
-- one-time prekeys and its own tokens. What the identity row held for its
-- one device (the fingerprint hash and the main key) moves to its device 1;
-- the single-device API answers the lowest-numbered device's key. The
-- SQLite twin (010_devices.sqlite.sql) must describe the same tables.

CREATE TABLE devices (
    user_id UUID NOT NULL REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    -- 1, 2, ... within the identity, from cyphr_identities.next_device_id:
    -- never reused, so that a client's list naming a removed device can
    -- never match a later one.
    device_id INTEGER NOT NULL,
    -- Hex HMAC-SHA256 of the device fingerprint under a server key.
    fingerprint_hash VARCHAR(64) NOT NULL,
    -- The device's name, sealed by the owner's client; opaque, at most 512 bytes.
    encrypted_name BYTEA,
    kyber_public_key BYTEA NOT NULL,        -- ML-KEM-1024 encapsulation key, 1568 bytes
    kyber_key_signature BYTEA NOT NULL,
    kyber_key_id BIGINT,
    kyber_key_created_at BIGINT,
    kyber_key_expires_at BIGINT,
    kyber_key_signature_version INTEGER NOT NULL,
    -- Tokens of this device issued before this instant are refused.
    tokens_valid_after BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    last_seen BIGINT,
    PRIMARY KEY (user_id, device_id),
    UNIQUE (user_id, fingerprint_hash)
);

COMMENT ON COLUMN devices.kyber_key_signature_version IS
    '1: Ed25519 over "cyphr-kyber-key:" || key; 2: a KeyBinding signature (label ml-kem-key, no device id); 3: a DeviceKeyBinding signature (label device-key)';

ALTER TABLE cyphr_identities ADD COLUMN next_device_id INTEGER NOT NULL DEFAULT 1;

INSERT INTO devices (user_id, device_id, fingerprint_hash, kyber_public_key, kyber_key_signature,
                     kyber_key_id, kyber_key_created_at, kyber_key_expires_at,
                     kyber_key_signature_version, tokens_valid_after, created_at, last_seen)
    SELECT id, 1, device_fingerprint_hash, kyber_public_key, kyber_key_signature, kyber_key_id,
           kyber_key_created_at, kyber_key_expires_at, kyber_key_signature_version,
           tokens_valid_after, created_at, last_seen
    FROM cyphr_identities
    WHERE device_fingerprint_hash IS NOT NULL AND kyber_public_key IS NOT NULL
      AND kyber_key_signature IS NOT NULL;

UPDATE cyphr_identities SET next_device_id = 2
    WHERE EXISTS (SELECT 1 FROM devices d WHERE d.user_id = cyphr_identities.id);

-- One-time prekeys belong to a device: the existing ones to device 1.
ALTER TABLE one_time_prekeys ADD COLUMN device_id INTEGER NOT NULL DEFAULT 1;
DELETE FROM one_time_prekeys p
    WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.user_id = p.user_id AND d.device_id = 1);
ALTER TABLE one_time_prekeys ALTER COLUMN device_id DROP DEFAULT;
ALTER TABLE one_time_prekeys DROP CONSTRAINT one_time_prekeys_pkey;
ALTER TABLE one_time_prekeys ADD PRIMARY KEY (user_id, device_id, key_id);
ALTER TABLE one_time_prekeys ADD FOREIGN KEY (user_id, device_id)
    REFERENCES devices (user_id, device_id) ON DELETE CASCADE;

DROP INDEX cyphr_identities_device;
ALTER TABLE cyphr_identities
    DROP COLUMN device_fingerprint_hash,
    DROP COLUMN kyber_public_key,
    DROP COLUMN kyber_key_signature,
    DROP COLUMN kyber_key_id,
    DROP COLUMN kyber_key_created_at,
    DROP COLUMN kyber_key_expires_at,
    DROP COLUMN kyber_key_signature_version;
