//! Which device owns which twin: a database (SQLite in the cloud host's state directory by
//! default, or PostgreSQL for a fleet of hosts) and a directory per twin
//! (`twins/<device>/<name>/`) for its disks and state, on the host that runs it.
//!
//! Both databases take the same statements (`$N` parameters, which SQLite reads as `?N`), all
//! values text, so one code path serves both.
//!
//! A device is named by the SHA-256 of the client certificate it showed ([`DeviceId`]); every
//! query is scoped to one device, so another device's twin is [`StoreError::NotFound`], exactly
//! as a twin that does not exist: a device cannot even learn that the name is taken elsewhere.

use std::path::{Path, PathBuf};

use std::sync::Mutex;

use rusqlite::Connection;
use sha2::{Digest, Sha256};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database said no.
    #[error("twin store: {0}")]
    Db(#[from] rusqlite::Error),
    /// PostgreSQL said no, or the connection to it failed.
    #[error("twin store: postgresql: {0}")]
    Postgres(#[from] postgres::Error),
    /// A twin directory could not be made or removed.
    #[error("twin store: {0}")]
    Io(#[from] std::io::Error),
    /// This device has no twin of that name.
    #[error("no twin named {0:?}")]
    NotFound(String),
    /// This device already has a twin of that name.
    #[error("a twin named {0:?} exists")]
    Exists(String),
    /// A name that could not be a directory of ours.
    #[error("bad twin name {0:?}: 1-64 of a-z, 0-9, '-' and '_', not starting with '-'")]
    BadName(String),
}

/// A device: the SHA-256 of the DER of the client certificate it authenticated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceId([u8; 32]);

impl DeviceId {
    /// The device that showed the certificate `der`.
    pub fn of_certificate(der: &[u8]) -> DeviceId {
        DeviceId(Sha256::digest(der).into())
    }

    /// Lower-case hexadecimal, as stored and as its directory is named.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Where a twin is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinState {
    /// Offloaded: it runs (or is about to run) on the cloud host.
    Running,
    /// Gone back to its device; its directory keeps the copy it left with.
    Returned,
}

impl TwinState {
    fn as_str(self) -> &'static str {
        match self {
            TwinState::Running => "running",
            TwinState::Returned => "returned",
        }
    }

    fn parse(s: &str) -> Option<TwinState> {
        match s {
            "running" => Some(TwinState::Running),
            "returned" => Some(TwinState::Returned),
            _ => None,
        }
    }
}

/// What a twin is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinKind {
    /// A profile offloaded to run here (and return).
    Offload,
    /// A replica: the device's sealed checkpoints, kept for a recovery; nothing runs here.
    Replica,
    /// A live copy of a profile that runs on at the device, with an identity of its own;
    /// it does not return.
    Clone,
}

impl TwinKind {
    fn as_str(self) -> &'static str {
        match self {
            TwinKind::Offload => "offload",
            TwinKind::Replica => "replica",
            TwinKind::Clone => "clone",
        }
    }

    fn parse(s: &str) -> Option<TwinKind> {
        match s {
            "offload" => Some(TwinKind::Offload),
            "replica" => Some(TwinKind::Replica),
            "clone" => Some(TwinKind::Clone),
            _ => None,
        }
    }
}

/// One device's twin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Twin {
    /// Its name (the profile's name on the device).
    pub name: String,
    /// Where it is (a replica is always `Returned`: it never runs here).
    pub state: TwinState,
    /// What it is for.
    pub kind: TwinKind,
    /// Its directory, under the store's `twins/`.
    pub dir: PathBuf,
}

/// The twins of all devices: rows in the database, directories in `<state dir>/twins/`.
pub struct TwinStore {
    db: Db,
    twins: PathBuf,
}

/// Where the rows are.
enum Db {
    Sqlite(Connection),
    Postgres(Mutex<postgres::Client>),
}

/// The table, the same in both databases (the `kind` column came with replicas).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS twins (
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'offload',
    PRIMARY KEY (device, name)
)";

/// Serialises the schema's creation between hosts starting at once (`pg_advisory_xact_lock`).
const SCHEMA_LOCK: i64 = 0x7076_636c_6f75; // "pvclou"

impl Db {
    /// Runs `sql` with `args` as `$1`.., returns the rows it changed.
    fn execute(&self, sql: &str, args: &[&str]) -> Result<u64, StoreError> {
        match self {
            Db::Sqlite(c) => Ok(c.execute(
                &sql.replace('$', "?"),
                rusqlite::params_from_iter(args.iter()),
            )? as u64),
            Db::Postgres(c) => Ok(lock(c).execute(sql, &pg_args(args))?),
        }
    }

    /// The rows of `sql` with `args` as `$1`.., each column as text.
    fn rows(&self, sql: &str, args: &[&str]) -> Result<Vec<Vec<String>>, StoreError> {
        match self {
            Db::Sqlite(c) => {
                let mut q = c.prepare(&sql.replace('$', "?"))?;
                let n = q.column_count();
                let rows = q.query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    (0..n).map(|i| r.get::<_, String>(i)).collect()
                })?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
            Db::Postgres(c) => Ok(lock(c)
                .query(sql, &pg_args(args))?
                .iter()
                .map(|r| (0..r.len()).map(|i| r.get::<_, String>(i)).collect())
                .collect()),
        }
    }
}

fn lock(c: &Mutex<postgres::Client>) -> std::sync::MutexGuard<'_, postgres::Client> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn pg_args<'a>(args: &'a [&'a str]) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
    args.iter()
        .map(|a| a as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

/// Whether `name` can name a twin (and be one path component of ours).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn checked(name: &str) -> Result<&str, StoreError> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(StoreError::BadName(name.to_string()))
    }
}

impl TwinStore {
    /// Opens (creating if needed) the store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<TwinStore, StoreError> {
        let twins = state_dir.join("twins");
        std::fs::create_dir_all(&twins)?;
        let db = Connection::open(state_dir.join("twins.db"))?;
        db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")?;
        db.execute_batch(SCHEMA)?;
        // Stores made before replicas had no kind: their twins are offloads.
        let has_kind = db
            .prepare("SELECT 1 FROM pragma_table_info('twins') WHERE name = 'kind'")?
            .exists([])?;
        if !has_kind {
            db.execute_batch("ALTER TABLE twins ADD COLUMN kind TEXT NOT NULL DEFAULT 'offload';")?;
        }
        Ok(TwinStore {
            db: Db::Sqlite(db),
            twins,
        })
    }

    /// Connects to the PostgreSQL database at `url` (a `postgresql://` URL or a `key=value`
    /// string; not encrypted: a unix socket or a private network), creating the table if
    /// needed; the twins' directories are in `state_dir` on this host.
    pub fn connect(url: &str, state_dir: &Path) -> Result<TwinStore, StoreError> {
        let twins = state_dir.join("twins");
        std::fs::create_dir_all(&twins)?;
        let mut client = postgres::Client::connect(url, postgres::NoTls)?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        tx.batch_execute(SCHEMA)?;
        tx.commit()?;
        Ok(TwinStore {
            db: Db::Postgres(Mutex::new(client)),
            twins,
        })
    }

    fn dir_of(&self, device: &DeviceId, name: &str) -> PathBuf {
        self.twins.join(device.hex()).join(name)
    }

    /// A new twin `name` of `device`, running, with an empty directory.
    pub fn create(&self, device: &DeviceId, name: &str) -> Result<Twin, StoreError> {
        self.create_kind(device, name, TwinKind::Offload)
    }

    /// A new twin `name` of `device` of `kind` (an offload `Running`, a replica `Returned`),
    /// with an empty directory.
    pub fn create_kind(
        &self,
        device: &DeviceId,
        name: &str,
        kind: TwinKind,
    ) -> Result<Twin, StoreError> {
        let name = checked(name)?;
        let dir = self.dir_of(device, name);
        let state = match kind {
            TwinKind::Offload | TwinKind::Clone => TwinState::Running,
            TwinKind::Replica => TwinState::Returned,
        };
        let inserted = self.db.execute(
            "INSERT INTO twins (device, name, state, kind) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&device.hex(), name, state.as_str(), kind.as_str()],
        )?;
        if inserted == 0 {
            return Err(StoreError::Exists(name.to_string()));
        }
        // A directory left by a twin removed half-way is not this twin's.
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            let _ = self.db.execute(
                "DELETE FROM twins WHERE device = $1 AND name = $2",
                &[&device.hex(), name],
            );
            return Err(e.into());
        }
        Ok(Twin {
            name: name.to_string(),
            state,
            kind,
            dir,
        })
    }

    /// `device`'s twin `name`; NotFound for another device's.
    pub fn get(&self, device: &DeviceId, name: &str) -> Result<Twin, StoreError> {
        let name = checked(name)?;
        let rows = self.db.rows(
            "SELECT state, kind FROM twins WHERE device = $1 AND name = $2",
            &[&device.hex(), name],
        )?;
        let (state, kind) = rows
            .first()
            .and_then(|r| Some((TwinState::parse(&r[0])?, TwinKind::parse(&r[1])?)))
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        Ok(Twin {
            name: name.to_string(),
            state,
            kind,
            dir: self.dir_of(device, name),
        })
    }

    /// `device`'s twins, by name.
    pub fn list(&self, device: &DeviceId) -> Result<Vec<Twin>, StoreError> {
        let rows = self.db.rows(
            "SELECT name, state, kind FROM twins WHERE device = $1 ORDER BY name",
            &[&device.hex()],
        )?;
        let mut twins = Vec::new();
        for row in rows {
            let [name, state, kind] = <[String; 3]>::try_from(row).map_err(|_| {
                StoreError::Io(std::io::Error::other("a twins row of another shape"))
            })?;
            // A row this code did not write is skipped, not trusted.
            let (Some(state), Some(kind), true) = (
                TwinState::parse(&state),
                TwinKind::parse(&kind),
                valid_name(&name),
            ) else {
                continue;
            };
            twins.push(Twin {
                dir: self.dir_of(device, &name),
                name,
                state,
                kind,
            });
        }
        Ok(twins)
    }

    /// Records what twin `name` of `device` now is (a returned offload cloned under its
    /// name becomes a clone, and the other way round).
    pub fn set_kind(
        &self,
        device: &DeviceId,
        name: &str,
        kind: TwinKind,
    ) -> Result<(), StoreError> {
        let name = checked(name)?;
        let n = self.db.execute(
            "UPDATE twins SET kind = $3 WHERE device = $1 AND name = $2",
            &[&device.hex(), name, kind.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// Records where `device`'s twin `name` is.
    pub fn set_state(
        &self,
        device: &DeviceId,
        name: &str,
        state: TwinState,
    ) -> Result<(), StoreError> {
        let name = checked(name)?;
        let n = self.db.execute(
            "UPDATE twins SET state = $3 WHERE device = $1 AND name = $2",
            &[&device.hex(), name, state.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// Forgets `device`'s twin `name` and removes its directory.
    pub fn remove(&self, device: &DeviceId, name: &str) -> Result<(), StoreError> {
        let name = checked(name)?;
        let n = self.db.execute(
            "DELETE FROM twins WHERE device = $1 AND name = $2",
            &[&device.hex(), name],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        match std::fs::remove_dir_all(self.dir_of(device, name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (DeviceId, DeviceId) {
        (
            DeviceId::of_certificate(b"certificate of phone A"),
            DeviceId::of_certificate(b"certificate of phone B"),
        )
    }

    /// Runs `check` with an opener of a store on SQLite and (where PostgreSQL is installed; a
    /// must under CI) on a fresh PostgreSQL database; both open twin directories in the path.
    fn on_both(test: &str, check: impl Fn(&dyn Fn(&Path) -> TwinStore)) {
        check(&|dir| TwinStore::open(dir).unwrap());
        if let Some(url) = mdm::store::pg_scratch::database_for_test(test) {
            check(&|dir| TwinStore::connect(&url, dir).unwrap());
        }
    }

    #[test]
    fn a_device_sees_and_changes_only_its_own_twins() {
        on_both(
            "cloud_own_twins",
            a_device_sees_and_changes_only_its_own_twins_in,
        );
    }

    fn a_device_sees_and_changes_only_its_own_twins_in(open: &dyn Fn(&Path) -> TwinStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let (a, b) = devices();
        let twin = s.create(&a, "work").unwrap();
        assert!(twin.dir.is_dir());
        assert!(twin.dir.starts_with(dir.path().join("twins")));
        assert_eq!(s.get(&a, "work").unwrap(), twin);
        // B cannot see, list, return or remove A's twin, and is told it does not exist.
        assert!(matches!(s.get(&b, "work"), Err(StoreError::NotFound(_))));
        assert!(s.list(&b).unwrap().is_empty());
        assert!(matches!(
            s.set_state(&b, "work", TwinState::Returned),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(s.remove(&b, "work"), Err(StoreError::NotFound(_))));
        assert!(twin.dir.is_dir());
        // B may have its own "work", in another directory.
        let theirs = s.create(&b, "work").unwrap();
        assert_ne!(theirs.dir, twin.dir);
        assert_eq!(s.list(&a).unwrap(), vec![twin.clone()]);
        assert_eq!(s.list(&b).unwrap(), vec![theirs]);
    }

    #[test]
    fn twins_outlive_the_process_and_removal_takes_the_directory() {
        on_both(
            "cloud_twins_outlive",
            twins_outlive_the_process_and_removal_takes_the_directory_in,
        );
    }

    fn twins_outlive_the_process_and_removal_takes_the_directory_in(
        open: &dyn Fn(&Path) -> TwinStore,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = devices();
        let twin = {
            let s = open(dir.path());
            let t = s.create(&a, "personal").unwrap();
            s.set_state(&a, "personal", TwinState::Returned).unwrap();
            t
        };
        let s = open(dir.path());
        assert_eq!(s.get(&a, "personal").unwrap().state, TwinState::Returned);
        assert!(matches!(
            s.create(&a, "personal"),
            Err(StoreError::Exists(_))
        ));
        s.remove(&a, "personal").unwrap();
        assert!(!twin.dir.exists());
        assert!(matches!(
            s.get(&a, "personal"),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn names_that_are_not_one_plain_path_component_are_refused() {
        on_both(
            "cloud_names",
            names_that_are_not_one_plain_path_component_are_refused_in,
        );
    }

    fn names_that_are_not_one_plain_path_component_are_refused_in(
        open: &dyn Fn(&Path) -> TwinStore,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let (a, _) = devices();
        for bad in [
            "",
            "..",
            "../x",
            "a/b",
            "-rf",
            "Work",
            "w\0",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(s.create(&a, bad), Err(StoreError::BadName(_))),
                "{bad:?}"
            );
            assert!(matches!(s.get(&a, bad), Err(StoreError::BadName(_))));
        }
        assert!(s.create(&a, &"x".repeat(64)).is_ok());
        assert!(s.create(&a, "my_phone-2").is_ok());
    }

    #[test]
    fn a_replica_is_a_twin_of_its_own_kind_and_old_stores_gain_the_column() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A store as it was before kinds.
            let db = Connection::open(dir.path().join("twins.db")).unwrap();
            db.execute_batch(
                "CREATE TABLE twins (device TEXT NOT NULL, name TEXT NOT NULL, \
                 state TEXT NOT NULL, PRIMARY KEY (device, name));",
            )
            .unwrap();
            let (a, _) = devices();
            db.execute(
                "INSERT INTO twins VALUES (?1, 'old', 'returned')",
                rusqlite::params![a.hex()],
            )
            .unwrap();
        }
        let s = TwinStore::open(dir.path()).unwrap();
        let (a, b) = devices();
        assert_eq!(s.get(&a, "old").unwrap().kind, TwinKind::Offload);
        let r = s.create_kind(&a, "work", TwinKind::Replica).unwrap();
        assert_eq!((r.kind, r.state), (TwinKind::Replica, TwinState::Returned));
        assert_eq!(s.get(&a, "work").unwrap(), r);
        assert!(matches!(s.get(&b, "work"), Err(StoreError::NotFound(_))));
        assert_eq!(s.list(&a).unwrap().len(), 2);
        // A clone runs from its creation; a twin's kind changes with what it is used for.
        let c = s.create_kind(&a, "copy", TwinKind::Clone).unwrap();
        assert_eq!((c.kind, c.state), (TwinKind::Clone, TwinState::Running));
        s.set_kind(&a, "old", TwinKind::Clone).unwrap();
        assert_eq!(s.get(&a, "old").unwrap().kind, TwinKind::Clone);
        assert!(matches!(
            s.set_kind(&b, "old", TwinKind::Clone),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn a_device_is_named_by_its_certificate() {
        let (a, b) = devices();
        assert_ne!(a, b);
        assert_eq!(a, DeviceId::of_certificate(b"certificate of phone A"));
        assert_eq!(a.hex().len(), 64);
    }
}
