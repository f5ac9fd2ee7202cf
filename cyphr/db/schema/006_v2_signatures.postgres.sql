-- Version 2 signatures (docs/encryption.rst): every key signature binds the
-- key's kind, owner, id and validity; the clear-text recovery phrase hint
-- goes; encrypted backups of pinned contacts arrive. The SQLite twin
-- (006_v2_signatures.sqlite.sql) must describe the same tables.

ALTER TABLE cyphr_identities
    ADD COLUMN kyber_key_id BIGINT,
    ADD COLUMN kyber_key_created_at BIGINT,
    ADD COLUMN kyber_key_expires_at BIGINT,
    ADD COLUMN kyber_key_signature_version INTEGER NOT NULL DEFAULT 1,
    -- A hint to the recovery phrase, in the clear, helped whoever read the
    -- table more than its owner: clients keep theirs in encrypted_settings.
    DROP COLUMN recovery_phrase_hint;

COMMENT ON COLUMN cyphr_identities.kyber_key_id IS
    'Id of the main ML-KEM key (the owner''s key generation), as signed; NULL for a v1 key';
COMMENT ON COLUMN cyphr_identities.kyber_key_created_at IS
    'When the main key was made (ms), as its owner signed it; NULL for a v1 key';
COMMENT ON COLUMN cyphr_identities.kyber_key_expires_at IS
    'When the main key stops being valid (ms), as signed; NULL for a v1 key';
COMMENT ON COLUMN cyphr_identities.kyber_key_signature_version IS
    '1: Ed25519 over "cyphr-kyber-key:" || key (keys stored before v2); 2: a KeyBinding signature (label ml-kem-key)';

ALTER TABLE one_time_prekeys
    ADD COLUMN key_created_at BIGINT,
    ADD COLUMN key_expires_at BIGINT,
    ADD COLUMN signature_version INTEGER NOT NULL DEFAULT 1;

COMMENT ON COLUMN one_time_prekeys.key_created_at IS
    'When the prekey was made (ms), as its owner signed it (created_at is the upload); NULL for v1';
COMMENT ON COLUMN one_time_prekeys.key_expires_at IS
    'When the prekey stops being valid (ms), as signed: claims skip it from then on; NULL for v1';
COMMENT ON COLUMN one_time_prekeys.signature_version IS
    '1: Ed25519 over "cyphr-kyber-key:" || key; 2: a KeyBinding signature (label one-time-prekey)';

-- A client's backup of the identity keys it pinned for its contacts, sealed
-- on the device under a key from the recovery phrase: opaque to the server,
-- at most 256 KiB, one per identity.
CREATE TABLE pin_backups (
    user_id UUID PRIMARY KEY REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    blob BYTEA NOT NULL,
    updated_at BIGINT NOT NULL
);
