-- Session keys (docs/encryption.rst, "Sessions"; cyphr.client.sessions).
-- The server stores what devices publish to be reached in sessions and
-- hands it out; every key is signed by the identity key over its owner,
-- device, kind, id and validity (cyphr.signing.SessionPrekeyBinding),
-- checked on upload and checked again by every client. The SQLite twin
-- (014_session_keys.sqlite.sql) must describe the same tables.

-- The identity's X25519 key for sessions, the same for all its devices
-- (derived from the identity's seed), certified by the identity key
-- (label identity-dh). Set once; it never changes for an identity.
CREATE TABLE session_identity_keys (
    user_id UUID PRIMARY KEY REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    public_key BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);

-- A device's prekeys by kind: 1 its signed X25519 prekey and 3 its
-- last-resort ML-KEM-1024 prekey (one of each: an upload replaces it),
-- 2 one-time X25519 and 4 one-time ML-KEM-1024 prekeys (each handed out
-- once, then deleted).
CREATE TABLE session_prekeys (
    user_id UUID NOT NULL,
    device_id INTEGER NOT NULL,
    kind SMALLINT NOT NULL CHECK (kind BETWEEN 1 AND 4),
    key_id BIGINT NOT NULL,
    public_key BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    key_created_at BIGINT NOT NULL,   -- as the owner signed them (ms)
    key_expires_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, kind, key_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
