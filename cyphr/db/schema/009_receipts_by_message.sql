-- The retention purge deletes the receipts of the messages it deletes by
-- message id. The primary key of message_receipts leads with chat_id, so
-- without this index every batch of the purge scanned every receipt (2M
-- receipts: 0.67 s a batch, under the database's write lock on SQLite).

CREATE INDEX message_receipts_message ON message_receipts (message_id);
