-- Cyphr IDs of deleted identities. A deleted identity's messages stay in
-- their chats under its cyphrId, so the name is never given to anyone else:
-- a newcomer could otherwise pass for the old owner.

CREATE TABLE retired_cyphr_ids (
    cyphr_id VARCHAR(30) PRIMARY KEY,
    retired_at BIGINT NOT NULL
);
