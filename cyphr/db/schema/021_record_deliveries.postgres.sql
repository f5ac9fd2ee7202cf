-- Delivery receipts in batches: what ReceiptsHandler writes for the
-- message_delivered receipts that arrive together, in one call. One
-- receipt on its own took nine round trips (the message's look-up, then
-- BEGIN, the receipt row, the member's mark, the envelope, the device's
-- mark, its receipts past the mark, their clean-up, COMMIT), each parsed
-- and planned afresh: with every message acknowledged, receipts cost the
-- server some 1 ms and PostgreSQL some 1.2 ms a message, where storing and
-- delivering the message itself cost about 0.1 and 0.3 ms
-- (benchmarks/realtime_load.py --acknowledge; docs/scaling.rst).
--
-- The steps, and their order, are the Python ones in cyphr/store/chats.py
-- (ChatStore.record_deliveries, _delivered_txn, device_delivered, and
-- cyphr/store/envelopes.py drop_envelope), which SQLite runs: keep the two
-- in sync. The tests of receipts, marks and envelopes run on both engines.
-- The SQLite twin (021_record_deliveries.sqlite.sql) is empty.

-- The device (user id, device id) of member p_member acknowledged the
-- message p_message with seq p_seq in chat p_chat: its envelope goes (and
-- the body with the last one), its mark moves there when the message is
-- the next one or nothing it is to receive lies between (and on over the
-- receipts it then reaches, which go), else a receipt records the message
-- past the mark. (cyphr/store/chats.py device_delivered.)
CREATE FUNCTION device_delivered(p_user UUID, p_device INTEGER, p_chat UUID, p_message UUID,
                                 p_member TEXT, p_seq BIGINT)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    top BIGINT;
    mark BIGINT;
BEGIN
    DELETE FROM message_envelopes e
    WHERE e.user_id = p_user AND e.device_id = p_device AND e.chat_id = p_chat AND e.seq = p_seq;
    IF FOUND THEN
        -- The message's row locked first, as erase_bare_bodies does: of two
        -- devices dropping a message's last two envelopes at once, the
        -- second then sees the first's deletion.
        UPDATE messages m SET encrypted_content = m.encrypted_content
        WHERE m.chat_id = p_chat AND m.seq = p_seq;
        UPDATE messages m SET encrypted_content = NULL
        WHERE m.chat_id = p_chat AND m.seq = p_seq AND m.encrypted_content IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM message_envelopes e WHERE e.chat_id = m.chat_id AND e.seq = m.seq);
    END IF;

    UPDATE device_deliveries d SET delivered_up_to_seq = p_seq
    WHERE d.user_id = p_user AND d.device_id = p_device AND d.chat_id = p_chat
      AND d.delivered_up_to_seq = p_seq - 1;
    IF NOT FOUND THEN
        INSERT INTO device_deliveries (user_id, device_id, chat_id, delivered_up_to_seq)
        SELECT p_user, p_device, p_chat, p.joined_seq FROM chat_participants p
        WHERE p.chat_id = p_chat AND p.user_id = p_member
        ON CONFLICT (user_id, device_id, chat_id) DO NOTHING;
        IF NOT device_mark_over_gap(p_user, p_device, p_chat, p_member, p_seq) THEN
            INSERT INTO device_receipts (user_id, device_id, chat_id, message_id)
            VALUES (p_user, p_device, p_chat, p_message)
            ON CONFLICT (user_id, device_id, chat_id, message_id) DO NOTHING;
            RETURN;
        END IF;
    END IF;

    -- The mark moved: on over the receipts past it, if any.
    IF NOT EXISTS (SELECT 1 FROM device_receipts r
                   WHERE r.user_id = p_user AND r.device_id = p_device AND r.chat_id = p_chat) THEN
        RETURN;
    END IF;
    SELECT max(m.seq) INTO top FROM device_receipts r JOIN messages m ON m.chat_id = p_chat AND m.id = r.message_id
    WHERE r.user_id = p_user AND r.device_id = p_device AND r.chat_id = p_chat;
    IF top IS NULL THEN
        RETURN;
    END IF;
    mark := p_seq;
    IF top > p_seq AND device_mark_over_gap(p_user, p_device, p_chat, p_member, top) THEN
        mark := top;
    END IF;
    DELETE FROM device_receipts r
    WHERE r.user_id = p_user AND r.device_id = p_device AND r.chat_id = p_chat
      AND EXISTS (SELECT 1 FROM messages m WHERE m.chat_id = p_chat AND m.id = r.message_id AND m.seq <= mark);
END
$$;

-- The device's mark moved to p_seq when nothing the device is to receive
-- lies between (cyphr/store/chats.py _DEVICE_MARK_OVER_GAP).
CREATE FUNCTION device_mark_over_gap(p_user UUID, p_device INTEGER, p_chat UUID, p_member TEXT,
                                     p_seq BIGINT)
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE device_deliveries d SET delivered_up_to_seq = p_seq
    WHERE d.user_id = p_user AND d.device_id = p_device AND d.chat_id = p_chat
      AND d.delivered_up_to_seq < p_seq
      AND NOT EXISTS (SELECT 1 FROM messages m JOIN chat_participants p
                      ON p.chat_id = m.chat_id AND p.user_id = p_member
                      WHERE m.chat_id = p_chat AND m.seq > d.delivered_up_to_seq AND m.seq < p_seq
                        AND m.seq > p.joined_seq
                        AND (m.sender_id <> p.user_id OR m.sender_device <> d.device_id)
                        AND m.deleted_at IS NULL
                        AND NOT EXISTS (SELECT 1 FROM device_receipts r
                                        WHERE r.user_id = d.user_id AND r.device_id = d.device_id
                                          AND r.chat_id = m.chat_id AND r.message_id = m.id));
    RETURN FOUND;
END
$$;

-- The receipts: item i says member members[i], on its device (user_ids[i],
-- device_ids[i]), acknowledged message message_ids[i] (of chat
-- chat_ids[i]; NULL from old clients that do not name it) at times[i]
-- (ms). Each is first looked up as the member may see it (a member of its
-- chat, sent after the member joined: MessageStore.by_id_for_member); one
-- that is not found answers no row. Another's message gets the member's
-- receipt (first_receipt: whether it is the member's first for it), the
-- member's mark moves, and the device's; the member's own message, sent
-- from another of its devices, moves that device's mark only. One row an
-- item found: its place in the arrays (from 1), and the message's id,
-- chat and sender.
--
-- Generic plans, made once per connection (the functions it calls inherit
-- the setting): PostgreSQL's CPU a receipt fell from 190 to 100 µs with 20
-- receipts a call and from 340 to 270 µs with one, against planning each
-- statement for its values (benchmarks/store_batch.py, runs side by side;
-- the steps a round trip each cost 820-1,010 µs). Named chats are still
-- read in their partition alone, pruned when the plan is run.
CREATE FUNCTION record_deliveries(message_ids UUID[], chat_ids UUID[], members TEXT[],
                                  user_ids UUID[], device_ids INTEGER[], times BIGINT[])
RETURNS TABLE (n INTEGER, message_id UUID, chat_id UUID, sender_id TEXT, first_receipt BOOLEAN)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    i INTEGER;
    found_chat UUID;
    found_seq BIGINT;
    found_sender TEXT;
    found_device INTEGER;
    first BOOLEAN;
BEGIN
    FOR i IN 1 .. coalesce(array_length(message_ids, 1), 0) LOOP
        -- Two statements rather than "chat_ids[i] IS NULL OR ...": named,
        -- the chat's partition alone is read.
        IF chat_ids[i] IS NULL THEN
            SELECT m.chat_id, m.seq, m.sender_id, m.sender_device
            INTO found_chat, found_seq, found_sender, found_device
            FROM messages m JOIN chat_participants p ON p.chat_id = m.chat_id AND p.user_id = members[i]
            WHERE m.id = message_ids[i] AND m.seq > p.joined_seq;
        ELSE
            SELECT m.chat_id, m.seq, m.sender_id, m.sender_device
            INTO found_chat, found_seq, found_sender, found_device
            FROM messages m JOIN chat_participants p ON p.chat_id = m.chat_id AND p.user_id = members[i]
            WHERE m.id = message_ids[i] AND m.seq > p.joined_seq AND m.chat_id = chat_ids[i];
        END IF;
        CONTINUE WHEN NOT FOUND;
        first := false;
        IF found_sender <> members[i] THEN
            INSERT INTO message_receipts AS r (chat_id, message_id, user_id, delivered_at)
            VALUES (found_chat, message_ids[i], members[i], times[i])
            ON CONFLICT ON CONSTRAINT message_receipts_pkey DO NOTHING;
            first := FOUND;
            UPDATE chat_participants p SET delivered_up_to_seq = found_seq
            WHERE p.chat_id = found_chat AND p.user_id = members[i] AND p.delivered_up_to_seq = found_seq - 1;
            IF NOT FOUND THEN
                -- Over what the member does not receive or acknowledged out
                -- of order (cyphr/store/chats.py _MEMBER_MARK_OVER_GAP).
                UPDATE chat_participants p SET delivered_up_to_seq = found_seq
                WHERE p.chat_id = found_chat AND p.user_id = members[i] AND p.delivered_up_to_seq < found_seq
                  AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.chat_id = found_chat
                                  AND m.seq > p.delivered_up_to_seq AND m.seq < found_seq
                                  AND m.seq > p.joined_seq AND m.sender_id <> p.user_id
                                  AND m.deleted_at IS NULL
                                  AND NOT EXISTS (SELECT 1 FROM message_receipts r
                                                  WHERE r.chat_id = m.chat_id AND r.message_id = m.id
                                                    AND r.user_id = p.user_id));
            END IF;
            PERFORM device_delivered(user_ids[i], device_ids[i], found_chat, message_ids[i], members[i],
                                     found_seq);
        ELSIF found_device IS NOT NULL AND found_device <> device_ids[i] THEN
            PERFORM device_delivered(user_ids[i], device_ids[i], found_chat, message_ids[i], members[i],
                                     found_seq);
        END IF;
        RETURN QUERY SELECT i, message_ids[i], found_chat, found_sender, first;
    END LOOP;
END
$$;
