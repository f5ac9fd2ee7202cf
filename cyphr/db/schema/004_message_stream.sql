-- The message stream: one position per stored message, across all chats,
-- for GET /api/messaging/sync.
--
-- A send transaction takes the next positions by updating the single row of
-- message_stream; that row stays locked until the transaction commits, so
-- transactions commit in the order of their positions. A reader therefore
-- always sees a prefix of the stream, and a cursor (the last position a
-- client has seen) never skips a message that commits later with a smaller
-- position. Group commit makes the lock cheap: one batch of messages takes
-- it once.

CREATE TABLE message_stream (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_position BIGINT NOT NULL
);

INSERT INTO message_stream (id, last_position) VALUES (1, 0);

ALTER TABLE messages ADD COLUMN stream_position BIGINT NOT NULL DEFAULT 0;

CREATE INDEX messages_chat_stream ON messages (chat_id, stream_position);
