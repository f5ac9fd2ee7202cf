-- The device that sent each message: see 013_sender_device.postgres.sql.
-- NULL for messages stored before this version.

ALTER TABLE messages ADD COLUMN sender_device INTEGER;
