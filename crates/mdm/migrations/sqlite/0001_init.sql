-- Devices enrolled to this server; a device is known by its certificate's SHA-256.
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    cert_sha256 TEXT NOT NULL UNIQUE,
    enrolled_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
-- Enrollment tokens: only their SHA-256 is kept; each works once, until it expires.
CREATE TABLE enroll_tokens (
    token_sha256 TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
-- Commands queued per device; result is set once the device reports it.
CREATE TABLE commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES devices(id),
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    queued_at INTEGER NOT NULL,
    result TEXT,
    done_at INTEGER
);
CREATE INDEX commands_pending ON commands(device_id, done_at, id);
-- Every policy document pushed, per device.
CREATE TABLE policies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES devices(id),
    version INTEGER NOT NULL,
    document TEXT NOT NULL,
    pushed_at INTEGER NOT NULL
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE compliance (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL REFERENCES devices(id),
    received_at INTEGER NOT NULL,
    report TEXT NOT NULL
);
