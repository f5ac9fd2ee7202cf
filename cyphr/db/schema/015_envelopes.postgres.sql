-- Messages over sessions (docs/encryption.rst, "Messages over sessions";
-- issue #22): a send carries one opaque body (messages.encrypted_content)
-- and one envelope per recipient device, sealed in that pair's session.
-- Each device is given only its own envelope; an envelope is deleted once
-- its device acknowledges the message, and the body once no envelope of
-- it is left (every device acknowledged it, or the envelopes expired
-- after envelope_retention_days, or their devices were removed). The
-- SQLite twin (015_envelopes.sqlite.sql) must describe the same table.

CREATE TABLE message_envelopes (
    user_id UUID NOT NULL,
    device_id INTEGER NOT NULL,
    chat_id UUID NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,                    -- the message's, in its chat
    -- 'prekey': the session message still carries the handshake; 'message': it does not.
    kind TEXT NOT NULL CHECK (kind IN ('prekey', 'message')),
    envelope BYTEA NOT NULL,                -- opaque: a session message, at most 16 KiB
    created_at BIGINT NOT NULL,             -- ms; the message's
    PRIMARY KEY (user_id, device_id, chat_id, seq),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);

-- Whether a message has envelopes left (its body is erased when none is),
-- and the envelopes of a deleted message.
CREATE INDEX message_envelopes_message ON message_envelopes (chat_id, seq);
-- The retention sweep, oldest first.
CREATE INDEX message_envelopes_created ON message_envelopes (created_at);
