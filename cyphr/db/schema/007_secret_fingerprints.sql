-- One fingerprint per server secret (jwt_secret, fingerprint_key,
-- totp_key), recorded by the first server that starts on the database.
-- Every later start compares its own: a node whose secret differs refuses
-- to start, rather than refuse every token the other nodes issued, or fail
-- to read the TOTP secrets they stored.
--
-- fingerprint is the hex HMAC-SHA256, keyed by the secret, of a fixed label
-- ("cyphr secret fingerprint v1 <name>"): it tells whether two secrets are
-- equal, and nothing from which the secret could be recovered.
--
-- To rotate a secret on purpose: stop every node, delete its row, start the
-- nodes with the new value (the first start records it).

CREATE TABLE secret_fingerprints (
    name VARCHAR(40) PRIMARY KEY,
    fingerprint VARCHAR(64) NOT NULL,
    recorded_at BIGINT NOT NULL
);
