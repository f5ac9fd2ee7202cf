-- Group rosters: each group's chain of signed changes. The PostgreSQL twin
-- (016_group_rosters.postgres.sql) holds the comments; this file must
-- describe the same table.

CREATE TABLE group_rosters (
    chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    change BLOB NOT NULL,
    author TEXT NOT NULL,
    author_key BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (chat_id, epoch)
);
