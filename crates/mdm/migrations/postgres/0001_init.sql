-- PostgreSQL twin of sqlite/0001_init.sql: the same tables, columns and constraints, in
-- PostgreSQL's types (64-bit integers, identity keys, a real boolean). Times are Unix seconds.
-- Devices enrolled to this server; a device is known by its certificate's SHA-256.
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    cert_sha256 TEXT NOT NULL UNIQUE,
    enrolled_at BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT FALSE
);
-- Enrollment tokens: only their SHA-256 is kept; each works once, until it expires.
CREATE TABLE enroll_tokens (
    token_sha256 TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
-- Commands queued per device; result is set once the device reports it.
CREATE TABLE commands (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    queued_at BIGINT NOT NULL,
    result TEXT,
    done_at BIGINT
);
CREATE INDEX commands_pending ON commands(device_id, done_at, id);
-- Every policy document pushed, per device.
CREATE TABLE policies (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    version BIGINT NOT NULL,
    document TEXT NOT NULL,
    pushed_at BIGINT NOT NULL
);
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE compliance (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    received_at BIGINT NOT NULL,
    report TEXT NOT NULL
);
