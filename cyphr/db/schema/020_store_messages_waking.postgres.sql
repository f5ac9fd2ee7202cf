-- store_messages (schema 013) and the push wake-ups (schema 019) of the
-- messages it stored now, in one call: what the send batcher runs for a
-- batch when push is on. Before this function the batcher sent the same as
-- one statement of CTEs around store_messages, which PostgreSQL planned
-- afresh for every batch: 0.5-0.75 ms of planning, some 12 % of
-- PostgreSQL's time at 6,000 messages a second (perf, with batches of 30).
-- Here the plans are made once per connection. The SQLite twin
-- (020_store_messages_waking.sqlite.sql) is empty: SQLite queues the
-- wake-ups in the batch's transaction, in Python (cyphr/store/push.py).
--
-- A device is woken when it is registered for push, belongs to a member
-- of the message's chat, is not the device that sent it, has no socket on
-- a node heard from since ``live_since`` (ms) and has no wake-up queued
-- already (the outbox holds one a device). A resend (its row names the
-- message stored first) and a refused message (its row names none) wake
-- nobody. Each row is a message's answer (as store_messages answers it)
-- and the number of wake-ups queued by the call.
-- cyphr/store/push.py: wake_ups_sql is the same rule for SQLite.
CREATE FUNCTION store_messages_waking(
    chat_ids UUID[], sender_ids TEXT[], ids UUID[], payloads TEXT[],
    message_types TEXT[], client_message_ids TEXT[], created BIGINT[],
    sender_devices INTEGER[], now_ms BIGINT, live_since BIGINT)
RETURNS TABLE (message stored_message, woken BIGINT)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    answers stored_message[];
    queued BIGINT;
BEGIN
    answers := ARRAY(SELECT s FROM store_messages(chat_ids, sender_ids, ids, payloads,
                                                  message_types, client_message_ids,
                                                  created, sender_devices) s);
    WITH sent AS (
        SELECT DISTINCT t.chat_id, t.sender, coalesce(t.device, 0) AS device
        FROM unnest(chat_ids, sender_ids, ids, sender_devices)
             WITH ORDINALITY AS t (chat_id, sender, id, device, n)
        JOIN unnest(answers) a ON a.n = t.n AND a.id = t.id
    ), queued_now AS (
        INSERT INTO push_outbox (user_id, device_id, created_at, due_at)
        SELECT DISTINCT r.user_id, r.device_id, now_ms, now_ms
        FROM sent s
        JOIN chat_participants p ON p.chat_id = s.chat_id
        JOIN cyphr_identities i ON i.cyphr_id = p.user_id
        JOIN push_registrations r ON r.user_id = i.id
        WHERE NOT (i.cyphr_id = s.sender AND r.device_id = s.device)
          AND NOT EXISTS (SELECT 1 FROM device_connections c JOIN nodes nd ON nd.node_id = c.node_id
                          WHERE c.user_id = r.user_id AND c.device_id = r.device_id
                            AND nd.seen_at > live_since)
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO queued FROM queued_now;
    RETURN QUERY SELECT a, queued FROM unnest(answers) a;
END
$$;
