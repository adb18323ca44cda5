//! [`SqliteStore`]: the MDM store in one SQLite file (WAL), the default.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{token_hash, AuditEntry, Command, Device, Store, StoreError};

/// Schema steps, embedded; `PRAGMA user_version` counts those applied. Append, never edit;
/// `migrations/postgres/` has the same steps for [`super::PostgresStore`].
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_init.sql"),
    include_str!("../../migrations/sqlite/0002_device_key.sql"),
];

/// The SQLite store (WAL, one connection behind a mutex).
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::init(Connection::open(path)?)
    }

    /// An in-memory store, for tests and tools.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let applied: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let applied_steps = usize::try_from(applied).unwrap_or(usize::MAX);
        if applied_steps > MIGRATIONS.len() {
            return Err(StoreError::SchemaTooNew {
                found: applied,
                known: MIGRATIONS.len(),
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(applied_steps) {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
            tx.execute_batch(step)?;
            tx.pragma_update(
                None,
                "user_version",
                i64::try_from(i + 1).unwrap_or(i64::MAX),
            )?;
            tx.commit()?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn known_device(conn: &Connection, device_id: &str) -> Result<(), StoreError> {
        let found: Option<i64> = conn
            .query_row("SELECT 1 FROM devices WHERE id = ?1", [device_id], |r| {
                r.get(0)
            })
            .optional()?;
        found
            .map(|_| ())
            .ok_or_else(|| StoreError::UnknownDevice(device_id.to_owned()))
    }
}

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Device> {
    Ok(Device {
        id: r.get(0)?,
        cert_sha256: r.get(1)?,
        enrolled_at: r.get(2)?,
        revoked: r.get::<_, i64>(3)? != 0,
        public_key: r.get(4)?,
    })
}

/// A constraint failure on insert is a duplicate id, fingerprint or token.
fn unique(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Duplicate
        }
        e => e.into(),
    }
}

impl Store for SqliteStore {
    fn add_token(&self, token: &str, expires_at: i64) -> Result<(), StoreError> {
        let r = self.conn().execute(
            "INSERT INTO enroll_tokens (token_sha256, expires_at) VALUES (?1, ?2)",
            params![token_hash(token), expires_at],
        );
        r.map(drop).map_err(unique)
    }

    fn redeem_token(&self, token: &str, now: i64) -> Result<(), StoreError> {
        // One statement: two concurrent redemptions cannot both see the token unused.
        let changed = self.conn().execute(
            "UPDATE enroll_tokens SET used_at = ?2
             WHERE token_sha256 = ?1 AND used_at IS NULL AND expires_at > ?2",
            params![token_hash(token), now],
        )?;
        if changed == 1 {
            Ok(())
        } else {
            Err(StoreError::TokenRefused)
        }
    }

    fn add_device(&self, d: &Device) -> Result<(), StoreError> {
        let r = self.conn().execute(
            "INSERT INTO devices (id, cert_sha256, enrolled_at, revoked, public_key)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                d.id,
                d.cert_sha256,
                d.enrolled_at,
                i64::from(d.revoked),
                d.public_key
            ],
        );
        r.map(drop).map_err(unique)
    }

    fn device_by_cert(&self, cert_sha256: &str) -> Result<Option<Device>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, cert_sha256, enrolled_at, revoked, public_key FROM devices WHERE cert_sha256 = ?1",
                [cert_sha256],
                device_row,
            )
            .optional()?)
    }

    fn devices(&self) -> Result<Vec<Device>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, cert_sha256, enrolled_at, revoked, public_key FROM devices ORDER BY enrolled_at, id",
        )?;
        let rows = stmt
            .query_map([], device_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn revoke(&self, device_id: &str) -> Result<(), StoreError> {
        let changed = self
            .conn()
            .execute("UPDATE devices SET revoked = 1 WHERE id = ?1", [device_id])?;
        if changed == 1 {
            Ok(())
        } else {
            Err(StoreError::UnknownDevice(device_id.to_owned()))
        }
    }

    fn enqueue(
        &self,
        device_id: &str,
        kind: &str,
        body: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        let conn = self.conn();
        Self::known_device(&conn, device_id)?;
        conn.execute(
            "INSERT INTO commands (device_id, kind, body, queued_at) VALUES (?1, ?2, ?3, ?4)",
            params![device_id, kind, body, now],
        )?;
        Ok(conn.last_insert_rowid())
    }

    fn pending(&self, device_id: &str) -> Result<Vec<Command>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, kind, body, queued_at FROM commands
             WHERE device_id = ?1 AND done_at IS NULL ORDER BY id",
        )?;
        let rows = stmt
            .query_map([device_id], |r| {
                Ok(Command {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    body: r.get(2)?,
                    queued_at: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn complete(
        &self,
        device_id: &str,
        command_id: i64,
        result: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        // The device id is part of the match: a device cannot complete another's command.
        let changed = self.conn().execute(
            "UPDATE commands SET result = ?3, done_at = ?4
             WHERE id = ?1 AND device_id = ?2 AND done_at IS NULL",
            params![command_id, device_id, result, now],
        )?;
        if changed == 1 {
            Ok(())
        } else {
            Err(StoreError::UnknownCommand(command_id))
        }
    }

    fn record_policy(
        &self,
        device_id: &str,
        version: u64,
        document: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        Self::known_device(&conn, device_id)?;
        conn.execute(
            "INSERT INTO policies (device_id, version, document, pushed_at) VALUES (?1, ?2, ?3, ?4)",
            params![device_id, i64::try_from(version).unwrap_or(i64::MAX), document, now],
        )?;
        Ok(())
    }

    fn audit(&self, actor: &str, action: &str, detail: &str, now: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO audit (time, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
            params![now, actor, action, detail],
        )?;
        Ok(())
    }

    fn audit_log(&self) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT time, actor, action, detail FROM audit ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(AuditEntry {
                    time: r.get(0)?,
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn add_compliance(&self, device_id: &str, report: &str, now: i64) -> Result<(), StoreError> {
        let conn = self.conn();
        Self::known_device(&conn, device_id)?;
        conn.execute(
            "INSERT INTO compliance (device_id, received_at, report) VALUES (?1, ?2, ?3)",
            params![device_id, now, report],
        )?;
        Ok(())
    }

    fn latest_compliance(&self, device_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT report FROM compliance WHERE device_id = ?1 ORDER BY id DESC LIMIT 1",
                [device_id],
                |r| r.get(0),
            )
            .optional()?)
    }
}
