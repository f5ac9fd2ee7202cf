-- The device that sent each message (issue #13): a device's catch-up
-- then brings it what the account's other devices sent (each device sees
-- the whole conversation, as live delivery already showed it), never what
-- it sent itself; and a device's delivered mark moves over its own
-- messages. NULL for messages stored before this version, which a device
-- treats as its own (as before: no device received its account's
-- messages in a catch-up). The SQLite twin (013_sender_device.sqlite.sql)
-- adds the same column.

ALTER TABLE messages ADD COLUMN sender_device INTEGER;

-- store_messages (schema 005) takes each message's sending device and
-- answers it; the steps are unchanged.
DROP FUNCTION store_messages(UUID[], TEXT[], UUID[], TEXT[], TEXT[], TEXT[], BIGINT[]);
DROP FUNCTION store_messages_try(UUID[], TEXT[], UUID[], TEXT[], TEXT[], TEXT[], BIGINT[],
                                 stored_message[]);
DROP TYPE stored_message;

CREATE TYPE stored_message AS (
    n INTEGER, id UUID, chat_id UUID, seq BIGINT, sender_id TEXT,
    encrypted_content TEXT, message_type TEXT, client_message_id TEXT,
    created_at BIGINT, edited_at BIGINT, deleted_at BIGINT, stream_position BIGINT,
    sender_device INTEGER);

-- One try at a batch whose chats the caller has locked, given the messages
-- stored before under its clientMessageIds (``resends``).
CREATE FUNCTION store_messages_try(
    chat_ids UUID[], sender_ids TEXT[], ids UUID[], payloads TEXT[],
    message_types TEXT[], client_message_ids TEXT[], created BIGINT[],
    sender_devices INTEGER[], resends stored_message[])
RETURNS stored_message[]
LANGUAGE plpgsql
-- Planned once per connection: custom plans, made for the first calls,
-- cost more to make (100 partitions) than they save.
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    answers stored_message[];
BEGIN
    WITH input AS (
        SELECT t.n::INTEGER AS n, t.chat_id, t.sender_id, t.id, t.payload,
               t.message_type, t.client_message_id, t.created_at, t.sender_device
        FROM unnest(chat_ids, sender_ids, ids, payloads, message_types,
                    client_message_ids, created, sender_devices)
             WITH ORDINALITY AS t (chat_id, sender_id, id, payload, message_type,
                                   client_message_id, created_at, sender_device, n)
    ), allowed AS (
        SELECT i.* FROM input i
        WHERE EXISTS (SELECT 1 FROM chat_participants p
                      WHERE p.chat_id = i.chat_id AND p.user_id = i.sender_id)
    ), stored AS (
        SELECT r.n, r AS answer FROM unnest(resends) r WHERE r.n IN (SELECT a.n FROM allowed a)
    ), candidates AS (
        SELECT a.*, row_number() OVER (
                   PARTITION BY a.chat_id, a.sender_id, a.client_message_id ORDER BY a.n) AS copy
        FROM allowed a
        WHERE a.n NOT IN (SELECT s.n FROM stored s)
    ), fresh AS (
        SELECT c.*, row_number() OVER (ORDER BY c.n) AS k,
               row_number() OVER (PARTITION BY c.chat_id ORDER BY c.n) AS r,
               count(*) OVER (PARTITION BY c.chat_id) AS in_chat,
               count(*) OVER () AS in_batch
        FROM candidates c
        WHERE c.client_message_id IS NULL OR c.copy = 1
    ), stream AS (
        UPDATE message_stream s SET last_position = s.last_position + (SELECT count(*) FROM fresh)
        WHERE s.id = 1 AND EXISTS (SELECT 1 FROM fresh)
        RETURNING s.last_position
    ), chat_seqs AS (
        UPDATE chats ch SET last_seq = ch.last_seq + f.added, last_message_at = f.newest,
                            updated_at = f.newest
        FROM (SELECT fresh.chat_id, count(*) AS added, max(fresh.created_at) AS newest
              FROM fresh GROUP BY fresh.chat_id) f
        WHERE ch.id = f.chat_id
        RETURNING ch.id, ch.last_seq
    ), inserted AS (
        INSERT INTO messages (chat_id, seq, id, sender_id, encrypted_content, message_type,
                              client_message_id, created_at, stream_position, sender_device)
        SELECT f.chat_id, cs.last_seq - f.in_chat + f.r, f.id, f.sender_id, f.payload,
               f.message_type, f.client_message_id, f.created_at,
               st.last_position - f.in_batch + f.k, f.sender_device
        FROM fresh f JOIN chat_seqs cs ON cs.id = f.chat_id CROSS JOIN stream st
        RETURNING messages.id, messages.seq, messages.stream_position
    ), answer (message) AS (
        SELECT s.answer FROM stored s
        UNION ALL
        -- The caller has the rest of a new message already.
        SELECT ROW(f.n, m.id, NULL, m.seq, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   m.stream_position, NULL)::stored_message
        FROM fresh f JOIN inserted m ON m.id = f.id
        UNION ALL
        SELECT ROW(i.n, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   NULL, NULL)::stored_message
        FROM input i
        WHERE i.n NOT IN (SELECT a.n FROM allowed a)
    )
    SELECT array_agg(a.message) INTO answers FROM answer a;
    RETURN coalesce(answers, '{}');
END
$$;

CREATE FUNCTION store_messages(
    chat_ids UUID[], sender_ids TEXT[], ids UUID[], payloads TEXT[],
    message_types TEXT[], client_message_ids TEXT[], created BIGINT[],
    sender_devices INTEGER[])
RETURNS SETOF stored_message
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    answers stored_message[];
BEGIN
    -- Each statement below takes a new snapshot: it sees what committed
    -- while the locks were waited for. The chats are locked inside the try,
    -- so that the locks and the changes made under them belong to one
    -- (sub)transaction.
    BEGIN
        PERFORM 1 FROM chats c WHERE c.id = ANY (chat_ids) ORDER BY c.id FOR UPDATE;
        answers := store_messages_try(chat_ids, sender_ids, ids, payloads, message_types,
                                      client_message_ids, created, sender_devices, '{}');
    EXCEPTION WHEN unique_violation THEN
        -- A clientMessageId stored before. (The LIMIT keeps each look-up
        -- an index probe of one partition.)
        PERFORM 1 FROM chats c WHERE c.id = ANY (chat_ids) ORDER BY c.id FOR UPDATE;
        answers := store_messages_try(chat_ids, sender_ids, ids, payloads, message_types,
                                      client_message_ids, created, sender_devices, ARRAY(
            SELECT ROW(t.n, m.id, m.chat_id, m.seq, m.sender_id, m.encrypted_content,
                       m.message_type, m.client_message_id, m.created_at, m.edited_at,
                       m.deleted_at, m.stream_position, m.sender_device)::stored_message
            FROM unnest(chat_ids, sender_ids, client_message_ids)
                 WITH ORDINALITY AS t (chat_id, sender_id, client_message_id, n)
            CROSS JOIN LATERAL (
                SELECT * FROM messages m
                WHERE m.chat_id = t.chat_id AND m.sender_id = t.sender_id
                  AND m.client_message_id = t.client_message_id
                LIMIT 1) m
            WHERE t.client_message_id IS NOT NULL));
    END;
    RETURN QUERY SELECT * FROM unnest(answers);
END
$$;
