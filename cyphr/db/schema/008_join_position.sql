-- Where each member's view of a chat begins. A member added to a group
-- (or re-added after leaving or being removed) sees only the messages sent
-- from then on: the payloads of earlier ones were sealed to the members of
-- their time, and their metadata (ids, senders, times) is none of the
-- newcomer's business either. History, sync and receipts therefore read
-- only messages with seq > joined_seq.
--
-- joined_seq is the chat's last_seq at the moment the member joined: 0 for
-- the members a chat is created with, and for every member that joined
-- before this migration (what they could see then, they keep seeing).

ALTER TABLE chat_participants ADD COLUMN joined_seq BIGINT NOT NULL DEFAULT 0;
