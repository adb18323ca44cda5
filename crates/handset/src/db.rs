//! The SQLite store: profile registry, lifecycle events and the audit log.
//!
//! Schema changes are appended to [`MIGRATIONS`]; `PRAGMA user_version` counts the applied
//! steps. The database runs in WAL mode with a busy timeout, so several processes (the
//! daemon, `pocketvisor export`) may open it at once.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The schema, one step per entry; never edit a shipped step, append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: profiles, lifecycle events, audit log.
    "CREATE TABLE profiles (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL DEFAULT 'stopped',
        pid INTEGER,
        foreground INTEGER NOT NULL DEFAULT 0,
        vsock_cid INTEGER NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL,
        started_ms INTEGER,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time_ms INTEGER NOT NULL,
        profile TEXT NOT NULL,
        event TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_by_profile ON events(profile, id);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time_ms INTEGER NOT NULL,
        profile TEXT NOT NULL,
        event TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );",
    // 2: the cloud host a profile's clone runs at (`profile clone`), for files back from it.
    "ALTER TABLE profiles ADD COLUMN clone_host TEXT;",
    // 3: a profile's replication to a cloud host (`profile replicate`), run by the daemon.
    "CREATE TABLE replication (
        profile TEXT PRIMARY KEY REFERENCES profiles(name) ON DELETE CASCADE,
        to_host TEXT NOT NULL,
        every_s INTEGER NOT NULL,
        recipients TEXT NOT NULL,
        full_every INTEGER NOT NULL
    );",
];

/// A profile's replication setting (its `replication` row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// The cloud host, `HOST:PORT`.
    pub to: String,
    /// Seconds between checkpoints.
    pub every_s: u32,
    /// The keys that open the checkpoints (`pvp-public-...`).
    pub recipients: Vec<String>,
    /// A new chain (a full checkpoint) after this many.
    pub full_every: u32,
}

/// A profile's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRow {
    /// Profile name.
    pub name: String,
    /// Lifecycle state (see [`crate::ProfileState`]).
    pub state: String,
    /// VMM process id while running.
    pub pid: Option<i32>,
    /// Whether this profile is the foreground one.
    pub foreground: bool,
    /// The guest's vsock context id.
    pub vsock_cid: u32,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
    /// Last start, ms since the epoch.
    pub started_ms: Option<i64>,
    /// Why the profile is in its state (e.g. the restart limit was hit).
    pub detail: String,
}

/// One lifecycle event or audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number (per table).
    pub id: i64,
    /// Time, ms since the epoch.
    pub time_ms: i64,
    /// The profile it concerns (`-` for the daemon itself).
    pub profile: String,
    /// What happened, one word (`created`, `started`, `crashed`, ...).
    pub event: String,
    /// Details.
    pub detail: String,
}

/// The two record tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    /// Lifecycle events (what happened to the VMs).
    Events,
    /// Audit log (what was asked through the API, and transfers between profiles).
    Audit,
}

impl Log {
    fn table(self) -> &'static str {
        match self {
            Log::Events => "events",
            Log::Audit => "audit",
        }
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An open database.
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        // Owner only: SQLite creates the -wal and -shm files with the database's mode.
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
            .map_err(crate::Error::io(format!("cannot open {}", path.display())))?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut db = Self { conn };
        db.migrate()?;
        Ok(db)
    }

    /// Applies the migrations not yet applied, each in its own transaction.
    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
        if version > known {
            return Err(crate::Error::Internal(format!(
                "the database schema is version {version}, newer than this program's {known}"
            )));
        }
        let applied = usize::try_from(version).map_err(|_| {
            crate::Error::Internal(format!("the database schema version {version} is negative"))
        })?;
        for (i, step) in MIGRATIONS.iter().enumerate().skip(applied) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The schema version.
    pub fn version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Adds a stopped profile with the next free vsock CID; returns the CID.
    pub fn insert_profile(&self, name: &str) -> Result<u32> {
        let cid: u32 = self.conn.query_row(
            "SELECT COALESCE(MAX(vsock_cid), 2) + 1 FROM profiles",
            [],
            |r| r.get(0),
        )?;
        self.conn.execute(
            "INSERT INTO profiles (name, vsock_cid, created_ms) VALUES (?1, ?2, ?3)",
            params![name, cid, now_ms()],
        )?;
        Ok(cid)
    }

    /// Adds a stopped profile with vsock CID `cid` if it is valid and free, else with the next
    /// free one (as [`Db::insert_profile`]); returns the CID. An imported profile keeps the
    /// CID its snapshot's guest was given when it can.
    pub fn insert_profile_with_cid(&self, name: &str, cid: u32) -> Result<u32> {
        if cid >= 3 && cid != u32::MAX {
            let inserted = self.conn.execute(
                "INSERT INTO profiles (name, vsock_cid, created_ms)
                 SELECT ?1, ?2, ?3 WHERE NOT EXISTS
                    (SELECT 1 FROM profiles WHERE vsock_cid = ?2)",
                params![name, cid, now_ms()],
            )?;
            if inserted == 1 {
                return Ok(cid);
            }
        }
        self.insert_profile(name)
    }

    /// Runs `f` as one transaction: all its writes are committed, or none is (an error, or
    /// a crash before the commit, leaves the database as it was).
    pub fn atomically<T>(&self, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Removes a profile's row.
    pub fn delete_profile(&self, name: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM profiles WHERE name = ?1", [name])?;
        Ok(())
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProfileRow> {
        Ok(ProfileRow {
            name: r.get(0)?,
            state: r.get(1)?,
            pid: r.get(2)?,
            foreground: r.get(3)?,
            vsock_cid: r.get(4)?,
            created_ms: r.get(5)?,
            started_ms: r.get(6)?,
            detail: r.get(7)?,
        })
    }

    const COLUMNS: &'static str =
        "name, state, pid, foreground, vsock_cid, created_ms, started_ms, detail";

    /// One profile's row.
    pub fn profile(&self, name: &str) -> Result<Option<ProfileRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {} FROM profiles WHERE name = ?1", Self::COLUMNS),
                [name],
                Self::row,
            )
            .optional()?)
    }

    /// All profiles, by name.
    pub fn profiles(&self) -> Result<Vec<ProfileRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {} FROM profiles ORDER BY name",
            Self::COLUMNS
        ))?;
        let rows = stmt.query_map([], Self::row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records a state change; `pid` and `detail` replace the stored ones.
    pub fn set_state(&self, name: &str, state: &str, pid: Option<i32>, detail: &str) -> Result<()> {
        let started = if state == "running" && pid.is_some() {
            Some(now_ms())
        } else {
            None
        };
        self.conn.execute(
            "UPDATE profiles SET state = ?2, pid = ?3, detail = ?4,
                started_ms = COALESCE(?5, started_ms) WHERE name = ?1",
            params![name, state, pid, detail, started],
        )?;
        Ok(())
    }

    /// Records the cloud host (`HOST:PORT`) profile `name`'s clone runs at (`None`: none).
    pub fn set_clone_host(&self, name: &str, host: Option<&str>) -> Result<()> {
        self.conn.execute(
            "UPDATE profiles SET clone_host = ?2 WHERE name = ?1",
            params![name, host],
        )?;
        Ok(())
    }

    /// The cloud host profile `name`'s clone runs at, if one was recorded.
    pub fn clone_host(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT clone_host FROM profiles WHERE name = ?1",
                [name],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Sets (replacing) profile `name`'s replication.
    pub fn set_replication(&self, name: &str, r: &Replication) -> Result<()> {
        let recipients = serde_json::to_string(&r.recipients)
            .map_err(|e| crate::Error::Internal(format!("recipients: {e}")))?;
        self.conn.execute(
            "INSERT INTO replication (profile, to_host, every_s, recipients, full_every)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(profile) DO UPDATE SET to_host = ?2, every_s = ?3, recipients = ?4,
             full_every = ?5",
            params![name, r.to, r.every_s, recipients, r.full_every],
        )?;
        Ok(())
    }

    /// Removes profile `name`'s replication; whether it had one.
    pub fn remove_replication(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM replication WHERE profile = ?1", [name])?
            > 0)
    }

    /// Every profile's replication, by profile name.
    pub fn replications(&self) -> Result<Vec<(String, Replication)>> {
        let mut st = self.conn.prepare(
            "SELECT profile, to_host, every_s, recipients, full_every FROM replication
             ORDER BY profile",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, u32>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, to, every_s, recipients, full_every) = row?;
            let recipients = serde_json::from_str(&recipients).map_err(|e| {
                crate::Error::Internal(format!("{name}: the replication's recipients: {e}"))
            })?;
            out.push((
                name,
                Replication {
                    to,
                    every_s,
                    recipients,
                    full_every,
                },
            ));
        }
        Ok(out)
    }

    /// Makes `name` the only foreground profile (`None`: no foreground profile).
    pub fn set_foreground(&self, name: Option<&str>) -> Result<()> {
        self.conn.execute(
            "UPDATE profiles SET foreground = (name IS ?1)",
            params![name],
        )?;
        Ok(())
    }

    /// Appends a record to `log`.
    pub fn record(&self, log: Log, profile: &str, event: &str, detail: &str) -> Result<()> {
        self.conn.execute(
            &format!(
                "INSERT INTO {} (time_ms, profile, event, detail) VALUES (?1, ?2, ?3, ?4)",
                log.table()
            ),
            params![now_ms(), profile, event, detail],
        )?;
        Ok(())
    }

    /// The last `limit` records of `log` (all profiles if `profile` is `None`), oldest first.
    pub fn records(&self, log: Log, profile: Option<&str>, limit: u32) -> Result<Vec<Event>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT id, time_ms, profile, event, detail FROM
                (SELECT * FROM {} WHERE ?1 IS NULL OR profile = ?1 ORDER BY id DESC LIMIT ?2)
             ORDER BY id",
            log.table()
        ))?;
        let rows = stmt.query_map(params![profile, limit], event_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// At most `limit` records with an id larger than `after` (`profile` None: all), oldest
    /// first: the next page of a log being followed.
    pub fn records_after(
        &self,
        log: Log,
        profile: Option<&str>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Event>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT id, time_ms, profile, event, detail FROM {}
             WHERE (?1 IS NULL OR profile = ?1) AND id > ?2 ORDER BY id LIMIT ?3",
            log.table()
        ))?;
        let rows = stmt.query_map(params![profile, after, limit], event_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// An `Event` from a row of `SELECT id, time_ms, profile, event, detail`.
fn event_row(r: &rusqlite::Row) -> rusqlite::Result<Event> {
    Ok(Event {
        id: r.get(0)?,
        time_ms: r.get(1)?,
        profile: r.get(2)?,
        event: r.get(3)?,
        detail: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replication_is_set_replaced_and_goes_with_its_profile() {
        let t = tempfile::tempdir().unwrap();
        let db = Db::open(&t.path().join("h.db")).unwrap();
        db.insert_profile("a").unwrap();
        db.insert_profile("b").unwrap();
        let mut r = Replication {
            to: "cloud.example:7000".into(),
            every_s: 30,
            recipients: vec!["pvp-public-00".into()],
            full_every: 120,
        };
        db.set_replication("a", &r).unwrap();
        r.every_s = 2;
        db.set_replication("a", &r).unwrap();
        db.set_replication("b", &r).unwrap();
        assert_eq!(
            db.replications().unwrap(),
            [("a".to_string(), r.clone()), ("b".to_string(), r.clone())]
        );
        // No replication of a profile that does not exist.
        assert!(db.set_replication("nobody", &r).is_err());
        assert!(db.remove_replication("b").unwrap());
        assert!(!db.remove_replication("b").unwrap());
        db.delete_profile("a").unwrap();
        assert!(db.replications().unwrap().is_empty());
    }

    #[test]
    fn migrations_profiles_and_records() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("h.db");
        let db = Db::open(&path).unwrap();
        assert_eq!(db.version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(db.insert_profile("a").unwrap(), 3);
        assert_eq!(db.insert_profile("b").unwrap(), 4);
        assert!(db.insert_profile("a").is_err());
        // A free CID is kept, a taken or reserved one replaced by the next free one.
        assert_eq!(db.insert_profile_with_cid("c", 9).unwrap(), 9);
        assert_eq!(db.insert_profile_with_cid("d", 3).unwrap(), 10);
        assert_eq!(db.insert_profile_with_cid("e", 2).unwrap(), 11);
        assert!(db.insert_profile_with_cid("c", 12).is_err());
        for n in ["c", "d", "e"] {
            db.delete_profile(n).unwrap();
        }
        db.set_state("a", "running", Some(42), "").unwrap();
        db.set_foreground(Some("a")).unwrap();
        let a = db.profile("a").unwrap().unwrap();
        assert_eq!(
            (a.state.as_str(), a.pid, a.foreground),
            ("running", Some(42), true)
        );
        assert!(a.started_ms.is_some());
        db.set_foreground(Some("b")).unwrap();
        assert!(!db.profile("a").unwrap().unwrap().foreground);
        // A clone's host, recorded and replaced; none for another profile or no profile.
        assert_eq!(db.clone_host("a").unwrap(), None);
        db.set_clone_host("a", Some("cloud.example:7000")).unwrap();
        db.set_clone_host("a", Some("[::1]:7000")).unwrap();
        assert_eq!(db.clone_host("a").unwrap().as_deref(), Some("[::1]:7000"));
        assert_eq!(db.clone_host("b").unwrap(), None);
        assert_eq!(db.clone_host("nobody").unwrap(), None);
        db.record(Log::Events, "a", "started", "pid 42").unwrap();
        db.record(Log::Events, "b", "started", "").unwrap();
        db.record(Log::Audit, "a", "start", "ok").unwrap();
        assert_eq!(db.records(Log::Events, Some("a"), 10).unwrap().len(), 1);
        assert_eq!(db.records(Log::Events, None, 10).unwrap().len(), 2);
        assert_eq!(db.records(Log::Events, None, 1).unwrap()[0].profile, "b");
        // Following a log pages forward from an id, oldest first, never skipping any.
        for i in 0..5 {
            db.record(Log::Events, "b", "tick", &i.to_string()).unwrap();
        }
        let first = db.records(Log::Events, None, 100).unwrap()[0].id;
        let mut seen = Vec::new();
        let mut after = first;
        loop {
            let page = db.records_after(Log::Events, Some("b"), after, 2).unwrap();
            let Some(last) = page.last() else { break };
            after = last.id;
            seen.extend(page.into_iter().map(|e| e.event + &e.detail));
        }
        assert_eq!(
            seen,
            ["started", "tick0", "tick1", "tick2", "tick3", "tick4"]
        );
        db.delete_profile("a").unwrap();
        assert!(db.profile("a").unwrap().is_none());
        drop(db);
        // Reopening applies nothing and keeps the data.
        let db = Db::open(&path).unwrap();
        assert_eq!(db.profiles().unwrap().len(), 1);
    }
}
