-- Push wake-ups. The PostgreSQL twin (019_push.postgres.sql) holds the
-- comments; this file must describe the same tables.

CREATE TABLE push_registrations (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('apns', 'fcm', 'webpush', 'unifiedpush')),
    token TEXT,
    endpoint TEXT,
    p256dh BLOB,
    auth BLOB,
    app_id TEXT,
    sandbox INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    counter INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE,
    CHECK ((kind IN ('apns', 'fcm')) = (token IS NOT NULL)),
    CHECK ((kind IN ('webpush', 'unifiedpush')) = (endpoint IS NOT NULL))
);

CREATE TABLE push_outbox (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent_at INTEGER,
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES push_registrations (user_id, device_id)
        ON DELETE CASCADE
);

CREATE INDEX push_outbox_due ON push_outbox (due_at) WHERE sent_at IS NULL;

CREATE TABLE device_connections (
    user_id TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    sockets INTEGER NOT NULL CHECK (sockets > 0),
    PRIMARY KEY (user_id, device_id, node_id)
);

CREATE INDEX device_connections_node ON device_connections (node_id);

CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    seen_at INTEGER NOT NULL
);
