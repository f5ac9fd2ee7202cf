-- Storing a batch of messages in one statement (group commit, see
-- cyphr/handlers/sending.py). The steps are those of the SQLite twin's
-- Python code (cyphr/store/messages.py), here in one round trip:
--
-- 1. lock the batch's chats, in id order, as every writer does (lock order:
--    chats, then members, then the stream): a removal in progress is waited
--    for, and the membership read after it sees it;
-- 2. keep the messages whose sender is a member of their chat;
-- 3. a clientMessageId stored before answers its stored message; one used
--    twice in the batch stores the first only;
-- 4. take stream positions (the row lock that orders commits, schema 004),
--    advance each chat's last_seq, and insert, in batch order.
--
-- Each argument holds one value per message. The result has a row for each
-- message stored or found stored (by its 1-based place n in the batch), and
-- a row with only n for each message whose sender is not a member. A later
-- message repeating a clientMessageId of the batch gets no row: the caller
-- answers it with the first one's.

CREATE FUNCTION store_messages(
    chat_ids UUID[], sender_ids TEXT[], ids UUID[], payloads TEXT[],
    message_types TEXT[], client_message_ids TEXT[], created BIGINT[])
RETURNS TABLE (
    n INTEGER, id UUID, chat_id UUID, seq BIGINT, sender_id TEXT,
    encrypted_content TEXT, message_type TEXT, client_message_id TEXT,
    created_at BIGINT, edited_at BIGINT, deleted_at BIGINT, stream_position BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM chats c WHERE c.id = ANY (chat_ids) ORDER BY c.id FOR UPDATE;

    -- A new statement, so a new snapshot: it sees what committed while the
    -- locks were waited for.
    RETURN QUERY
    WITH input AS (
        SELECT t.n::INTEGER AS n, t.chat_id, t.sender_id, t.id, t.payload,
               t.message_type, t.client_message_id, t.created_at
        FROM unnest(chat_ids, sender_ids, ids, payloads, message_types,
                    client_message_ids, created)
             WITH ORDINALITY AS t (chat_id, sender_id, id, payload, message_type,
                                   client_message_id, created_at, n)
    ), allowed AS (
        SELECT i.* FROM input i
        WHERE EXISTS (SELECT 1 FROM chat_participants p
                      WHERE p.chat_id = i.chat_id AND p.user_id = i.sender_id)
    ), stored AS (
        -- LIMIT keeps each lookup an index probe of one partition.
        SELECT a.n, m.* FROM allowed a
        CROSS JOIN LATERAL (
            SELECT m.id, m.chat_id, m.seq, m.sender_id, m.encrypted_content, m.message_type,
                   m.client_message_id, m.created_at, m.edited_at, m.deleted_at, m.stream_position
            FROM messages m
            WHERE m.chat_id = a.chat_id AND m.sender_id = a.sender_id
              AND m.client_message_id = a.client_message_id
            LIMIT 1) m
        WHERE a.client_message_id IS NOT NULL
    ), candidates AS (
        SELECT a.*, row_number() OVER (
                   PARTITION BY a.chat_id, a.sender_id, a.client_message_id ORDER BY a.n) AS copy
        FROM allowed a
        WHERE NOT EXISTS (SELECT 1 FROM stored s WHERE s.n = a.n)
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
                              client_message_id, created_at, stream_position)
        SELECT f.chat_id, cs.last_seq - f.in_chat + f.r, f.id, f.sender_id, f.payload,
               f.message_type, f.client_message_id, f.created_at,
               st.last_position - f.in_batch + f.k
        FROM fresh f JOIN chat_seqs cs ON cs.id = f.chat_id CROSS JOIN stream st
        RETURNING messages.id, messages.chat_id, messages.seq, messages.sender_id,
                  messages.encrypted_content, messages.message_type, messages.client_message_id,
                  messages.created_at, messages.edited_at, messages.deleted_at,
                  messages.stream_position
    )
    SELECT s.n, s.id, s.chat_id, s.seq, s.sender_id::TEXT, s.encrypted_content,
           s.message_type::TEXT, s.client_message_id::TEXT, s.created_at, s.edited_at,
           s.deleted_at, s.stream_position
    FROM stored s
    UNION ALL
    SELECT f.n, m.id, m.chat_id, m.seq, m.sender_id::TEXT, m.encrypted_content,
           m.message_type::TEXT, m.client_message_id::TEXT, m.created_at, m.edited_at,
           m.deleted_at, m.stream_position
    FROM fresh f JOIN inserted m ON m.id = f.id
    UNION ALL
    SELECT i.n, NULL::UUID, NULL::UUID, NULL::BIGINT, NULL::TEXT, NULL::TEXT, NULL::TEXT,
           NULL::TEXT, NULL::BIGINT, NULL::BIGINT, NULL::BIGINT, NULL::BIGINT
    FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM allowed a WHERE a.n = i.n);
END
$$;
