-- Messages over sessions: one envelope per recipient device. The
-- PostgreSQL twin (015_envelopes.postgres.sql) holds the comments; this
-- file must describe the same table.

CREATE TABLE message_envelopes (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('prekey', 'message')),
    envelope BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, chat_id, seq),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);

CREATE INDEX message_envelopes_message ON message_envelopes (chat_id, seq);
CREATE INDEX message_envelopes_created ON message_envelopes (created_at);
