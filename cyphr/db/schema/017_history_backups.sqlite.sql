-- History backups: one sealed blob per identity. The PostgreSQL twin
-- (017_history_backups.postgres.sql) holds the comments; this file must
-- describe the same table.

CREATE TABLE history_backups (
    user_id TEXT PRIMARY KEY REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    blob BLOB NOT NULL,
    updated_at INTEGER NOT NULL
);
