-- Attachments: uploaded blobs and the messages that name them. The
-- PostgreSQL twin (018_attachments.postgres.sql) holds the comments; this
-- file must describe the same tables.

CREATE TABLE attachments (
    id TEXT PRIMARY KEY,
    owner_id TEXT REFERENCES cyphr_identities (id) ON DELETE SET NULL,
    length INTEGER NOT NULL,
    received INTEGER NOT NULL DEFAULT 0,
    store_state TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    expires_at INTEGER,
    busy_until INTEGER,
    referenced INTEGER NOT NULL DEFAULT 0,
    gone_at INTEGER,
    CHECK (received BETWEEN 0 AND length)
);

CREATE INDEX attachments_owner ON attachments (owner_id, completed_at);
CREATE INDEX attachments_expires ON attachments (expires_at) WHERE gone_at IS NULL;
CREATE INDEX attachments_gone ON attachments (gone_at) WHERE gone_at IS NOT NULL;

CREATE TABLE message_attachments (
    chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    attachment_id TEXT NOT NULL REFERENCES attachments (id) ON DELETE CASCADE,
    PRIMARY KEY (chat_id, seq, attachment_id)
);

CREATE INDEX message_attachments_attachment ON message_attachments (attachment_id);
