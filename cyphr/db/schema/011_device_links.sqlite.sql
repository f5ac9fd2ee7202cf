-- Linking a device (docs/encryption.rst, "Linking a device"): provisionings
-- of new devices, approved by a signed-in device of the account, each
-- carrying the sealed identity seed until received and a single-use link
-- token. Rows live minutes and are purged after. The PostgreSQL twin
-- (011_device_links.postgres.sql) holds the comments on columns; this file
-- must describe the same table in SQLite types.

CREATE TABLE device_provisionings (
    id TEXT PRIMARY KEY,
    ephemeral_key BLOB NOT NULL,            -- X25519 (32 bytes) || ML-KEM-1024 (1568 bytes)
    secret_hash BLOB NOT NULL,              -- SHA-256 of the new device's secret
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    user_id TEXT REFERENCES cyphr_identities (id) ON DELETE CASCADE,  -- NULL until approved
    device_id INTEGER,                      -- reserved at approval
    sealed BLOB,                            -- NULL again once received
    link_token_hash BLOB,                   -- SHA-256 of the link token
    received_at BIGINT,
    linked_at BIGINT
);

CREATE INDEX device_provisionings_expires ON device_provisionings (expires_at);
CREATE UNIQUE INDEX device_provisionings_link_token ON device_provisionings (link_token_hash);
CREATE INDEX device_provisionings_user ON device_provisionings (user_id);
