-- Chats, their members, the encrypted messages and their receipts.
-- The PostgreSQL twin (002_messaging.postgres.sql) holds the comments on
-- columns; this file must describe the same tables in SQLite types. SQLite
-- has no partitions: messages is one table.

CREATE TABLE chats (
    id TEXT PRIMARY KEY,
    chat_type VARCHAR(20) NOT NULL DEFAULT 'direct'
        CHECK (chat_type IN ('direct', 'group')),
    direct_key VARCHAR(61) UNIQUE,
    encrypted_name TEXT,
    encrypted_settings TEXT,
    created_by VARCHAR(30),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_message_at BIGINT,
    last_seq BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE chat_participants (
    chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    user_id VARCHAR(30) NOT NULL
        REFERENCES cyphr_identities (cyphr_id) ON DELETE CASCADE,
    role VARCHAR(20) NOT NULL DEFAULT 'member' CHECK (role IN ('admin', 'member')),
    joined_at BIGINT NOT NULL,
    read_up_to_seq BIGINT NOT NULL DEFAULT 0,
    delivered_up_to_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (chat_id, user_id)
);

CREATE INDEX chat_participants_user ON chat_participants (user_id);

CREATE TABLE messages (
    chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    id TEXT NOT NULL,
    sender_id VARCHAR(30) NOT NULL,
    encrypted_content TEXT,
    message_type VARCHAR(20) NOT NULL DEFAULT 'text'
        CHECK (message_type IN ('text', 'image', 'file', 'audio', 'video', 'call', 'payment', 'system')),
    client_message_id VARCHAR(128),
    created_at BIGINT NOT NULL,
    edited_at BIGINT,
    deleted_at BIGINT,
    PRIMARY KEY (chat_id, seq)
);

CREATE INDEX messages_id ON messages (id);
CREATE UNIQUE INDEX messages_client_message_id ON messages (chat_id, sender_id, client_message_id);
CREATE INDEX messages_created_at ON messages (created_at);

CREATE TABLE message_receipts (
    chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    message_id TEXT NOT NULL,
    user_id VARCHAR(30) NOT NULL
        REFERENCES cyphr_identities (cyphr_id) ON DELETE CASCADE,
    delivered_at BIGINT,
    read_at BIGINT,
    PRIMARY KEY (chat_id, message_id, user_id)
);

CREATE INDEX message_receipts_user ON message_receipts (user_id);
