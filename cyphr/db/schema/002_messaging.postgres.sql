-- Chats, their members, the encrypted messages and their receipts.
-- Conventions: see 001_identities.postgres.sql. The SQLite twin
-- (002_messaging.sqlite.sql) must describe the same tables.

CREATE TABLE chats (
    id UUID PRIMARY KEY,                    -- chatId
    chat_type VARCHAR(20) NOT NULL DEFAULT 'direct'
        CHECK (chat_type IN ('direct', 'group')),
    -- Direct chats only: the two members' cyphrIds, sorted and joined by
    -- ':'. Its uniqueness makes exactly one direct chat per pair, also when
    -- both send their first message at the same moment.
    direct_key VARCHAR(61) COLLATE "C" UNIQUE,
    encrypted_name TEXT,                    -- group name, encrypted by the clients
    encrypted_settings TEXT,                -- opaque to the server
    created_by VARCHAR(30),                 -- cyphrId of the creator
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_message_at BIGINT,
    -- seq of the newest message. The next message of the chat gets
    -- last_seq + 1, assigned in the transaction that stores it, so seq has
    -- no gaps and no duplicates.
    last_seq BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE chat_participants (
    chat_id UUID NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    user_id VARCHAR(30) COLLATE "C" NOT NULL
        REFERENCES cyphr_identities (cyphr_id) ON DELETE CASCADE,
    role VARCHAR(20) NOT NULL DEFAULT 'member' CHECK (role IN ('admin', 'member')),
    joined_at BIGINT NOT NULL,              -- orders members: the oldest inherits admin
    read_up_to_seq BIGINT NOT NULL DEFAULT 0,      -- highest seq this member has read
    delivered_up_to_seq BIGINT NOT NULL DEFAULT 0, -- highest seq acknowledged as delivered
    PRIMARY KEY (chat_id, user_id)
);

CREATE INDEX chat_participants_user ON chat_participants (user_id);

-- Messages, hash-partitioned by chat into 100 partitions (messages_0 ..
-- messages_99): a chat's history lives in one partition, and the primary
-- key (chat_id, seq) serves history pages in either direction.
CREATE TABLE messages (
    chat_id UUID NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    id UUID NOT NULL,                       -- messageId
    -- cyphrId of the sender. No foreign key: a deleted sender's messages
    -- stay in their chats under the same senderId.
    sender_id VARCHAR(30) COLLATE "C" NOT NULL,
    -- The encryptedPayload JSON object exactly as received; never parsed
    -- for meaning. NULL once the sender deleted the message.
    encrypted_content TEXT,
    message_type VARCHAR(20) NOT NULL DEFAULT 'text'
        CHECK (message_type IN ('text', 'image', 'file', 'audio', 'video', 'call', 'payment', 'system')),
    -- The sender's idempotency key: the same one from the same sender in
    -- the same chat stores nothing new.
    client_message_id VARCHAR(128),
    created_at BIGINT NOT NULL,
    edited_at BIGINT,
    deleted_at BIGINT,
    PRIMARY KEY (chat_id, seq)
) PARTITION BY HASH (chat_id);

CREATE INDEX messages_id ON messages (id);
CREATE UNIQUE INDEX messages_client_message_id ON messages (chat_id, sender_id, client_message_id);
CREATE INDEX messages_created_at ON messages (created_at);

DO $$
BEGIN
    FOR i IN 0..99 LOOP
        EXECUTE format(
            'CREATE TABLE messages_%s PARTITION OF messages FOR VALUES WITH (MODULUS 100, REMAINDER %s)',
            i, i);
    END LOOP;
END
$$;

-- Delivery and read receipts, per message and recipient.
CREATE TABLE message_receipts (
    chat_id UUID NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    message_id UUID NOT NULL,
    user_id VARCHAR(30) COLLATE "C" NOT NULL
        REFERENCES cyphr_identities (cyphr_id) ON DELETE CASCADE,
    delivered_at BIGINT,
    read_at BIGINT,
    PRIMARY KEY (chat_id, message_id, user_id)
);

CREATE INDEX message_receipts_user ON message_receipts (user_id);
