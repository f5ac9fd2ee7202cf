-- Identities and everything that hangs on them: login challenges, revoked
-- tokens, one-time prekeys, two-factor secrets and wallet links.
--
-- Conventions of every schema file:
--   * times are milliseconds since the Unix epoch (UTC) as BIGINT, taken from
--     the server's injected clock, never from NOW(), so that tests can move
--     time and both engines store the same thing;
--   * binary values (keys, signatures, challenges) are raw bytes, not base64;
--   * the server stores public material only: no private key, seed phrase,
--     password or plaintext ever reaches a table.
-- The SQLite twin (001_identities.sqlite.sql) must describe the same tables.

CREATE TABLE cyphr_identities (
    -- Internal id: the JWT "sub" and the "userId" of the register and login
    -- answers. Clients name users by cyphr_id everywhere else.
    id UUID PRIMARY KEY,
    -- ^[a-z0-9_]{3,30}$. Collation "C" makes the unique index serve prefix
    -- searches (LIKE 'abc%') in any database locale.
    cyphr_id VARCHAR(30) COLLATE "C" NOT NULL UNIQUE,
    public_key BYTEA NOT NULL,              -- Ed25519 identity key, 32 bytes
    kyber_public_key BYTEA,                 -- ML-KEM-1024 encapsulation key, 1568 bytes
    kyber_key_signature BYTEA,              -- Ed25519 over "cyphr-kyber-key:" || kyber_public_key
    -- Hex HMAC-SHA256 of the device fingerprint under a server key; the
    -- fingerprint itself is never stored.
    device_fingerprint_hash VARCHAR(64),
    display_name VARCHAR(100),
    avatar_url TEXT,
    encrypted_settings TEXT,                -- opaque to the server
    recovery_phrase_hint VARCHAR(255),
    -- Tokens issued before this instant are refused: recovery on a new device
    -- moves it forward to revoke every earlier token at once.
    tokens_valid_after BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_seen BIGINT                        -- when the last socket of the user went away
);

CREATE INDEX cyphr_identities_device ON cyphr_identities (device_fingerprint_hash);

-- Login challenges: 32 random bytes the client signs with its identity key.
-- Single use: a challenge is consumed by setting used_at in the same
-- statement that checks it is unused and unexpired.
CREATE TABLE auth_challenges (
    id UUID PRIMARY KEY,                    -- challengeId
    -- The identity it was issued for; it may not exist yet (registration).
    cyphr_id VARCHAR(30) COLLATE "C" NOT NULL,
    challenge BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);

CREATE INDEX auth_challenges_expires ON auth_challenges (expires_at);

-- Tokens revoked one by one (logout). Rows can be purged once expires_at,
-- the token's own expiry, has passed.
CREATE TABLE revoked_tokens (
    jti VARCHAR(64) PRIMARY KEY,
    user_id UUID NOT NULL REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    expires_at BIGINT NOT NULL
);

CREATE INDEX revoked_tokens_expires ON revoked_tokens (expires_at);

-- One-time ML-KEM-1024 prekeys, each signed like the main Kyber key. A claim
-- hands one out and deletes it in one statement, so none is given twice.
CREATE TABLE one_time_prekeys (
    user_id UUID NOT NULL REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    key_id BIGINT NOT NULL,                 -- chosen by the owner's client
    kyber_public_key BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, key_id)
);

-- TOTP two-factor secrets, encrypted with the server's TOTP key (SecretBox).
CREATE TABLE totp_secrets (
    user_id UUID PRIMARY KEY REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    encrypted_secret BYTEA NOT NULL,
    enabled BOOLEAN NOT NULL DEFAULT FALSE, -- false until a first code is verified
    last_used_step BIGINT,                  -- last 30 s step accepted: a code works once
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- A Stellar account linked to an identity, proven by a signature of the
-- account's key. The server never holds a Stellar secret key.
CREATE TABLE wallet_links (
    user_id UUID PRIMARY KEY REFERENCES cyphr_identities (id) ON DELETE CASCADE,
    stellar_address VARCHAR(56) NOT NULL,   -- G... StrKey
    linked_at BIGINT NOT NULL
);

CREATE INDEX wallet_links_address ON wallet_links (stellar_address);
