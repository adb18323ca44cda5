//! Which device owns which twin: a SQLite database in the cloud host's state directory, and a
//! directory per twin (`twins/<device>/<name>/`) for its disks and state.
//!
//! A device is named by the SHA-256 of the client certificate it showed ([`DeviceId`]); every
//! query is scoped to one device, so another device's twin is [`StoreError::NotFound`], exactly
//! as a twin that does not exist: a device cannot even learn that the name is taken elsewhere.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database said no.
    #[error("twin store: {0}")]
    Db(#[from] rusqlite::Error),
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
}

impl TwinKind {
    fn as_str(self) -> &'static str {
        match self {
            TwinKind::Offload => "offload",
            TwinKind::Replica => "replica",
        }
    }

    fn parse(s: &str) -> Option<TwinKind> {
        match s {
            "offload" => Some(TwinKind::Offload),
            "replica" => Some(TwinKind::Replica),
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

/// The twins of all devices, in `<state dir>/twins.db` and `<state dir>/twins/`.
pub struct TwinStore {
    db: Connection,
    twins: PathBuf,
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
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS twins (
                 device TEXT NOT NULL,
                 name TEXT NOT NULL,
                 state TEXT NOT NULL,
                 PRIMARY KEY (device, name)
             );",
        )?;
        // Stores made before replicas had no kind: their twins are offloads.
        let has_kind = db
            .prepare("SELECT 1 FROM pragma_table_info('twins') WHERE name = 'kind'")?
            .exists([])?;
        if !has_kind {
            db.execute_batch("ALTER TABLE twins ADD COLUMN kind TEXT NOT NULL DEFAULT 'offload';")?;
        }
        Ok(TwinStore { db, twins })
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
            TwinKind::Offload => TwinState::Running,
            TwinKind::Replica => TwinState::Returned,
        };
        let inserted = self.db.execute(
            "INSERT OR IGNORE INTO twins (device, name, state, kind) VALUES (?1, ?2, ?3, ?4)",
            params![device.hex(), name, state.as_str(), kind.as_str()],
        )?;
        if inserted == 0 {
            return Err(StoreError::Exists(name.to_string()));
        }
        // A directory left by a twin removed half-way is not this twin's.
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            let _ = self.db.execute(
                "DELETE FROM twins WHERE device = ?1 AND name = ?2",
                params![device.hex(), name],
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
        let row: Option<(String, String)> = self
            .db
            .query_row(
                "SELECT state, kind FROM twins WHERE device = ?1 AND name = ?2",
                params![device.hex(), name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (state, kind) = row
            .and_then(|(s, k)| Some((TwinState::parse(&s)?, TwinKind::parse(&k)?)))
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
        let mut q = self
            .db
            .prepare("SELECT name, state, kind FROM twins WHERE device = ?1 ORDER BY name")?;
        let rows = q.query_map(params![device.hex()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut twins = Vec::new();
        for row in rows {
            let (name, state, kind) = row?;
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

    /// Records where `device`'s twin `name` is.
    pub fn set_state(
        &self,
        device: &DeviceId,
        name: &str,
        state: TwinState,
    ) -> Result<(), StoreError> {
        let name = checked(name)?;
        let n = self.db.execute(
            "UPDATE twins SET state = ?3 WHERE device = ?1 AND name = ?2",
            params![device.hex(), name, state.as_str()],
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
            "DELETE FROM twins WHERE device = ?1 AND name = ?2",
            params![device.hex(), name],
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

    #[test]
    fn a_device_sees_and_changes_only_its_own_twins() {
        let dir = tempfile::tempdir().unwrap();
        let s = TwinStore::open(dir.path()).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = devices();
        let twin = {
            let s = TwinStore::open(dir.path()).unwrap();
            let t = s.create(&a, "personal").unwrap();
            s.set_state(&a, "personal", TwinState::Returned).unwrap();
            t
        };
        let s = TwinStore::open(dir.path()).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let s = TwinStore::open(dir.path()).unwrap();
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
                params![a.hex()],
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
    }

    #[test]
    fn a_device_is_named_by_its_certificate() {
        let (a, b) = devices();
        assert_ne!(a, b);
        assert_eq!(a, DeviceId::of_certificate(b"certificate of phone A"));
        assert_eq!(a.hex().len(), 64);
    }
}
