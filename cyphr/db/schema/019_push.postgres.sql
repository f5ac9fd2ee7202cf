-- Push wake-ups (cyphr.handlers.push): a device that has no live socket is
-- woken through its push service (APNs, FCM, Web Push, UnifiedPush) when a
-- message is stored for it. A wake-up tells nothing: no sender, no chat, no
-- content, at most an opaque per-device counter. The SQLite twin
-- (019_push.sqlite.sql) must describe the same tables.

-- One registration per device: where its wake-ups go.
CREATE TABLE push_registrations (
    user_id UUID NOT NULL,
    device_id INTEGER NOT NULL,
    kind VARCHAR(16) NOT NULL CHECK (kind IN ('apns', 'fcm', 'webpush', 'unifiedpush')),
    token TEXT,                    -- APNs and FCM: the device token
    endpoint TEXT,                 -- Web Push and UnifiedPush: the push service's URL
    p256dh BYTEA,                  -- Web Push (RFC 8291): the subscription's P-256 key
    auth BYTEA,                    -- and its authentication secret
    app_id VARCHAR(255),           -- APNs topic (bundle id) or FCM project, when given
    sandbox BOOLEAN NOT NULL DEFAULT FALSE,  -- APNs: the development environment
    created_at BIGINT NOT NULL,    -- ms
    counter BIGINT NOT NULL DEFAULT 0,  -- wake-ups sent: the only thing a payload carries
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE,
    CHECK ((kind IN ('apns', 'fcm')) = (token IS NOT NULL)),
    CHECK ((kind IN ('webpush', 'unifiedpush')) = (endpoint IS NOT NULL))
);

-- The durable outbox: at most one wake-up per device, queued when a message
-- is stored for it while it has no live socket, and kept once sent until
-- the device connects again (so that a device is woken once, however many
-- messages wait for it). Several nodes drain it together (FOR UPDATE SKIP
-- LOCKED on PostgreSQL).
CREATE TABLE push_outbox (
    user_id UUID NOT NULL,
    device_id INTEGER NOT NULL,
    created_at BIGINT NOT NULL,    -- ms
    due_at BIGINT NOT NULL,        -- ms: when it may go (later after a failure)
    attempts INTEGER NOT NULL DEFAULT 0,
    sent_at BIGINT,                -- ms; then kept until the device connects
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES push_registrations (user_id, device_id)
        ON DELETE CASCADE
);

CREATE INDEX push_outbox_due ON push_outbox (due_at) WHERE sent_at IS NULL;

-- Which node holds live sockets of which device (maintained as sockets come
-- and go; a node's rows count only while the node is heard from).
CREATE TABLE device_connections (
    user_id UUID NOT NULL,
    device_id INTEGER NOT NULL,
    node_id VARCHAR(255) NOT NULL,
    sockets INTEGER NOT NULL CHECK (sockets > 0),
    PRIMARY KEY (user_id, device_id, node_id)
);

CREATE INDEX device_connections_node ON device_connections (node_id);

-- The nodes serving this database, each heard from every few seconds.
CREATE TABLE nodes (
    node_id VARCHAR(255) PRIMARY KEY,
    seen_at BIGINT NOT NULL        -- ms
);
