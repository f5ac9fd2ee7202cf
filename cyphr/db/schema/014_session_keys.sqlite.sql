-- Session keys: see 014_session_keys.postgres.sql, which this file must
-- describe in SQLite types.

CREATE TABLE session_identity_keys (
    user_id TEXT PRIMARY KEY REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    public_key BLOB NOT NULL,
    signature BLOB NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE session_prekeys (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    kind SMALLINT NOT NULL CHECK (kind BETWEEN 1 AND 4),
    key_id BIGINT NOT NULL,
    public_key BLOB NOT NULL,
    signature BLOB NOT NULL,
    key_created_at BIGINT NOT NULL,
    key_expires_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, kind, key_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
