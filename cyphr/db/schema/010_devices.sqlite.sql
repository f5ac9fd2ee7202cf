-- Several devices per identity (docs/encryption.rst, "Devices"). Each
-- device has its own ML-KEM-1024 key, signed by the identity key, its own
-- one-time prekeys and its own tokens. What the identity row held for its
-- one device (the fingerprint hash and the main key) moves to its device 1.
-- The PostgreSQL twin (010_devices.postgres.sql) holds the comments on
-- columns; this file must describe the same tables in SQLite types.

CREATE TABLE devices (
    user_id TEXT NOT NULL REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    device_id INTEGER NOT NULL,             -- never reused within an identity
    fingerprint_hash VARCHAR(64) NOT NULL,
    encrypted_name BLOB,                    -- sealed by the owner's client
    kyber_public_key BLOB NOT NULL,
    kyber_key_signature BLOB NOT NULL,
    kyber_key_id BIGINT,
    kyber_key_created_at BIGINT,
    kyber_key_expires_at BIGINT,
    kyber_key_signature_version INTEGER NOT NULL,  -- 1, 2 (ml-kem-key) or 3 (device-key)
    tokens_valid_after BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    last_seen BIGINT,
    PRIMARY KEY (user_id, device_id),
    UNIQUE (user_id, fingerprint_hash)
);

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
-- SQLite cannot change a primary key in place: the table is rebuilt.
CREATE TABLE one_time_prekeys_by_device (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    key_id BIGINT NOT NULL,
    kyber_public_key BLOB NOT NULL,
    signature BLOB NOT NULL,
    created_at BIGINT NOT NULL,
    key_created_at BIGINT,
    key_expires_at BIGINT,
    signature_version INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (user_id, device_id, key_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
INSERT INTO one_time_prekeys_by_device
    SELECT p.user_id, 1, p.key_id, p.kyber_public_key, p.signature, p.created_at,
           p.key_created_at, p.key_expires_at, p.signature_version
    FROM one_time_prekeys p
    WHERE EXISTS (SELECT 1 FROM devices d WHERE d.user_id = p.user_id AND d.device_id = 1);
DROP TABLE one_time_prekeys;
ALTER TABLE one_time_prekeys_by_device RENAME TO one_time_prekeys;

DROP INDEX cyphr_identities_device;
ALTER TABLE cyphr_identities DROP COLUMN device_fingerprint_hash;
ALTER TABLE cyphr_identities DROP COLUMN kyber_public_key;
ALTER TABLE cyphr_identities DROP COLUMN kyber_key_signature;
ALTER TABLE cyphr_identities DROP COLUMN kyber_key_id;
ALTER TABLE cyphr_identities DROP COLUMN kyber_key_created_at;
ALTER TABLE cyphr_identities DROP COLUMN kyber_key_expires_at;
ALTER TABLE cyphr_identities DROP COLUMN kyber_key_signature_version;
