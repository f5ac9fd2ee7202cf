-- Group rosters (docs/encryption.rst, "Group rosters"; cyphr.rosters): each
-- group's chain of signed changes, in epoch order. The server checks each
-- change as clients do (the signature by an admin of the state it names
-- by hash) and makes the group's members follow it, but cannot make a
-- change: clients check the whole chain with the keys they pinned. The
-- SQLite twin (016_group_rosters.sqlite.sql) must describe the same table.

CREATE TABLE group_rosters (
    chat_id UUID NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    epoch BIGINT NOT NULL,                  -- 1 for the first change, then 2, 3, ...
    change BYTEA NOT NULL,                  -- cyphr.rosters.SignedChange, as signed
    author TEXT NOT NULL,                   -- the Cyphr ID that signed it
    -- Its Ed25519 identity key then: the chain is checked again with it
    -- (the author's account may be gone since).
    author_key BYTEA NOT NULL,
    created_at BIGINT NOT NULL,             -- ms, when the server took it
    PRIMARY KEY (chat_id, epoch)
);
