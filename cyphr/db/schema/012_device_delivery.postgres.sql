-- Delivery per device (issue #13): each device of a member catches up on
-- its own. The member's own marks (chat_participants.delivered_up_to_seq,
-- message_receipts) stay what senders see: delivered to the user is
-- delivered to any of its devices. The SQLite twin
-- (012_device_delivery.sqlite.sql) must describe the same tables.

-- Each device's delivered mark in each chat: the highest seq up to which
-- it has acknowledged every message of others. A chat with no row for a
-- device counts from the member's joined_seq (a chat it joined after the
-- device was added); a device added to an identity gets a row for each
-- chat the identity is in, at that chat's newest seq: it receives what is
-- sent from then on (earlier messages are in the history).
CREATE TABLE device_deliveries (
    user_id UUID NOT NULL,
    device_id INTEGER NOT NULL,
    chat_id UUID NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    delivered_up_to_seq BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, chat_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);

CREATE INDEX device_deliveries_chat ON device_deliveries (chat_id);

-- Messages a device acknowledged past its mark (out of order): the
-- catch-up skips them.
CREATE TABLE device_receipts (
    user_id UUID NOT NULL,
    device_id INTEGER NOT NULL,
    chat_id UUID NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    message_id UUID NOT NULL,
    PRIMARY KEY (user_id, device_id, chat_id, message_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);

CREATE INDEX device_receipts_chat ON device_receipts (chat_id);

-- Every device so far is a device 1 that had the member's marks.
INSERT INTO device_deliveries (user_id, device_id, chat_id, delivered_up_to_seq)
    SELECT d.user_id, d.device_id, p.chat_id, p.delivered_up_to_seq
    FROM chat_participants p JOIN cyphr_identities i ON i.cyphr_id = p.user_id
    JOIN devices d ON d.user_id = i.id;

INSERT INTO device_receipts (user_id, device_id, chat_id, message_id)
    SELECT d.user_id, d.device_id, r.chat_id, r.message_id
    FROM message_receipts r
    JOIN chat_participants p ON p.chat_id = r.chat_id AND p.user_id = r.user_id
    JOIN messages m ON m.chat_id = r.chat_id AND m.id = r.message_id
    JOIN cyphr_identities i ON i.cyphr_id = r.user_id
    JOIN devices d ON d.user_id = i.id
    WHERE m.seq > p.delivered_up_to_seq
      AND (r.delivered_at IS NOT NULL OR r.read_at IS NOT NULL);
