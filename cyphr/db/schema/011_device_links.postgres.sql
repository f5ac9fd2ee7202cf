-- Linking a device (docs/encryption.rst, "Linking a device"): a new device
-- asks for a provisioning, a signed-in device of the account approves it
-- and leaves, through the server, the identity seed sealed to the new
-- device's ephemeral key; the new device fetches it with its secret and
-- registers its device key with a single-use link token. Rows live minutes
-- (expires_at) and are purged after (cyphr.handlers.maintenance). The
-- SQLite twin (011_device_links.sqlite.sql) must describe the same table.

CREATE TABLE device_provisionings (
    id UUID PRIMARY KEY,                    -- provisioningId, random
    -- The new device's ephemeral public key: X25519 (32 bytes) then
    -- ML-KEM-1024 (1568 bytes). Opaque to the server but for the ML-KEM
    -- check; the approver seals the seed to it.
    ephemeral_key BYTEA NOT NULL,
    -- SHA-256 of the secret only the new device holds; the secret itself
    -- is never stored.
    secret_hash BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    -- Until then the provisioning can be approved and received; once
    -- received, until then its link token can be used. Purged after.
    expires_at BIGINT NOT NULL,
    -- The identity whose device approved it; NULL until approved.
    user_id UUID REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    -- The device id reserved for the new device at approval (taken from
    -- cyphr_identities.next_device_id, so it is never anyone else's).
    device_id INTEGER,
    -- The seed sealed to ephemeral_key by the approver's client: opaque,
    -- at most 8192 bytes, and set back to NULL as soon as it is received.
    sealed BYTEA,
    -- SHA-256 of the single-use link token handed out with the sealed seed.
    link_token_hash BYTEA,
    received_at BIGINT,
    linked_at BIGINT                        -- the token was used up
);

CREATE INDEX device_provisionings_expires ON device_provisionings (expires_at);
CREATE UNIQUE INDEX device_provisionings_link_token ON device_provisionings (link_token_hash);
CREATE INDEX device_provisionings_user ON device_provisionings (user_id);
