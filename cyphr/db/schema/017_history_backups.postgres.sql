-- History backups (docs/encryption.rst, "The history backup"): one blob per
-- identity holding the messages a device of it kept, compressed and sealed
-- on the device under a key derived from the identity seed. The server
-- stores it as sent and hands it back to its owner only; it cannot read
-- it. A recovered or newly linked device restores it. The SQLite twin
-- (017_history_backups.sqlite.sql) must describe the same table.

CREATE TABLE history_backups (
    -- It goes with the identity.
    user_id UUID PRIMARY KEY REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    blob BYTEA NOT NULL,                    -- opaque, at most max_history_backup bytes
    updated_at BIGINT NOT NULL              -- ms, when the server took it
);
