-- Version 2 signatures (docs/encryption.rst): every key signature binds the
-- key's kind, owner, id and validity; the clear-text recovery phrase hint
-- goes; encrypted backups of pinned contacts arrive. The PostgreSQL twin
-- (006_v2_signatures.postgres.sql) holds the comments on columns.
--
-- The identity's main ML-KEM key: its id (the owner's key generation) and
-- validity as signed (ms), and the version of its signature: 1 for keys
-- stored before (signed over "cyphr-kyber-key:" || key, no id, no times),
-- 2 for KeyBinding signatures.
ALTER TABLE cyphr_identities ADD COLUMN kyber_key_id BIGINT;
ALTER TABLE cyphr_identities ADD COLUMN kyber_key_created_at BIGINT;
ALTER TABLE cyphr_identities ADD COLUMN kyber_key_expires_at BIGINT;
ALTER TABLE cyphr_identities ADD COLUMN kyber_key_signature_version INTEGER NOT NULL DEFAULT 1;

-- A hint to the recovery phrase, in the clear, helped whoever read the
-- table more than its owner: clients keep theirs in encrypted_settings.
ALTER TABLE cyphr_identities DROP COLUMN recovery_phrase_hint;

-- One-time prekeys, likewise: the validity as signed (created_at stays the
-- time of the upload) and the version of the signature. Claims skip expired
-- prekeys.
ALTER TABLE one_time_prekeys ADD COLUMN key_created_at BIGINT;
ALTER TABLE one_time_prekeys ADD COLUMN key_expires_at BIGINT;
ALTER TABLE one_time_prekeys ADD COLUMN signature_version INTEGER NOT NULL DEFAULT 1;

-- A client's backup of the identity keys it pinned for its contacts, sealed
-- on the device under a key from the recovery phrase: opaque to the server,
-- at most 256 KiB, one per identity.
CREATE TABLE pin_backups (
    user_id TEXT PRIMARY KEY REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    blob BLOB NOT NULL,
    updated_at BIGINT NOT NULL
);
