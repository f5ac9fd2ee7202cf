-- Attachments (docs/encryption.rst, "Attachments"): blobs the clients
-- encrypted, uploaded with the TUS protocol and kept in a blob store
-- (cyphr.blobs: files under the data directory, or an S3 bucket) under a
-- random id. The server knows a blob's length, its uploader and when;
-- never its key, name, type or content. The SQLite twin
-- (018_attachments.sqlite.sql) must describe the same tables.

CREATE TABLE attachments (
    id CHAR(32) COLLATE "C" PRIMARY KEY,    -- 128 random bits, hex
    -- The uploader. NULL once its account is deleted: the clean-up then
    -- removes the blob, and nothing serves it meanwhile.
    owner_id UUID REFERENCES cyphr_identities (id) ON DELETE SET NULL,
    length BIGINT NOT NULL,                 -- Upload-Length: the blob's bytes
    received BIGINT NOT NULL DEFAULT 0,     -- the durable offset
    -- What the blob store keeps between appends (an S3 multipart upload's
    -- id and parts), as JSON.
    store_state TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,             -- ms
    completed_at BIGINT,                    -- ms; NULL while uploading
    -- ms. An unfinished upload: created_at + upload_expiry. A completed
    -- one: completed_at + the attachment retention, or NULL (kept).
    expires_at BIGINT,
    -- An append in progress holds the upload until then (ms): a second
    -- PATCH meanwhile is 409, on any node.
    busy_until BIGINT,
    referenced BOOLEAN NOT NULL DEFAULT FALSE,  -- a message named it once
    -- ms. No longer served: the clean-up removes its blob, then the row.
    gone_at BIGINT,
    CHECK (received BETWEEN 0 AND length)
);

CREATE INDEX attachments_owner ON attachments (owner_id, completed_at);
CREATE INDEX attachments_expires ON attachments (expires_at) WHERE gone_at IS NULL;
CREATE INDEX attachments_gone ON attachments (gone_at) WHERE gone_at IS NOT NULL;

-- Which messages name which attachments, as their senders declared beside
-- the opaque payload: an attachment goes once the last message naming it
-- is deleted.
CREATE TABLE message_attachments (
    chat_id UUID NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    attachment_id CHAR(32) COLLATE "C" NOT NULL REFERENCES attachments (id) ON DELETE CASCADE,
    PRIMARY KEY (chat_id, seq, attachment_id)
);

CREATE INDEX message_attachments_attachment ON message_attachments (attachment_id);
