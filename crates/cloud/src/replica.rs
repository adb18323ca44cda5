//! A replica's checkpoints at the cloud host: sealed files (the device encrypted them; this
//! host cannot read them) in the replica twin's directory, one chain at a time.
//!
//! ```text
//! <twin dir>/current                  the chain being kept: 32 hexadecimal digits
//! <twin dir>/<chain>-<seq>.pvr        its checkpoints, seq 1 (full) to N, 8 decimal digits
//! <twin dir>/.incoming-<pid>          a checkpoint being received
//! ```
//!
//! A checkpoint is written under its temporary name, synced and renamed; `current` is
//! replaced (temporary file, sync, rename) only once the first checkpoint of a new chain is
//! in place, and the old chain's files are removed after that. So a host killed at any
//! point keeps the last whole chain: a partial checkpoint never gets its final name, and a
//! chain begins to count only when its full checkpoint is whole.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The file naming the chain being kept.
const CURRENT: &str = "current";
/// A checkpoint file's extension.
const EXT: &str = "pvr";
/// The largest checkpoint a host accepts.
pub const MAX_CHECKPOINT: u64 = 64 << 30;

/// Why a checkpoint was not stored or a chain not read.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A file could not be written, synced, renamed or read.
    #[error("replica storage: {0}")]
    Io(#[from] std::io::Error),
    /// A checkpoint that does not follow the stored chain.
    #[error(
        "checkpoint {seq} of chain {chain} does not follow the stored chain ({have}): send a \
         full checkpoint (seq 1) to start a new one"
    )]
    NotNext {
        /// The chain the device named.
        chain: String,
        /// The checkpoint's number.
        seq: u64,
        /// What this host has.
        have: String,
    },
    /// A chain id that is not 32 lower-case hexadecimal digits, or a sequence number of 0.
    #[error("a malformed chain id or checkpoint number")]
    Malformed,
    /// Nothing is stored.
    #[error("no checkpoint is stored")]
    Empty,
}

/// Whether `chain` is a chain id: 32 lower-case hexadecimal digits.
pub fn valid_chain(chain: &str) -> bool {
    chain.len() == 32
        && chain
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The checkpoints of one replica twin, in its directory.
pub struct ReplicaDir {
    dir: PathBuf,
}

/// A checkpoint being received: written to a temporary file, put in place by
/// [`Incoming::commit`], removed if dropped before.
pub struct Incoming {
    dir: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    chain: String,
    seq: u64,
}

impl ReplicaDir {
    /// The replica in `dir` (the twin's directory, which exists).
    pub fn new(dir: &Path) -> ReplicaDir {
        ReplicaDir {
            dir: dir.to_path_buf(),
        }
    }

    fn file(&self, chain: &str, seq: u64) -> PathBuf {
        self.dir.join(format!("{chain}-{seq:08}.{EXT}"))
    }

    /// The chain kept and its checkpoints' files, 1 to N in order (the run of whole files
    /// from 1); None if nothing is stored.
    pub fn chain(&self) -> Result<Option<(String, Vec<PathBuf>)>, ReplicaError> {
        let chain = match std::fs::read_to_string(self.dir.join(CURRENT)) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if !valid_chain(&chain) {
            return Err(ReplicaError::Malformed);
        }
        let mut files = Vec::new();
        loop {
            let f = self.file(&chain, files.len() as u64 + 1);
            if !f.is_file() {
                break;
            }
            files.push(f);
        }
        if files.is_empty() {
            return Err(ReplicaError::Empty);
        }
        Ok(Some((chain, files)))
    }

    /// Starts receiving checkpoint `seq` of `chain`: seq 1 starts a new chain (the stored one
    /// stays until it is whole); any other must be the next of the stored chain. A temporary
    /// file left by a killed receive is removed (one receive at a time: the caller holds the
    /// twin's lock).
    pub fn begin(&self, chain: &str, seq: u64) -> Result<Incoming, ReplicaError> {
        if !valid_chain(chain) || seq == 0 {
            return Err(ReplicaError::Malformed);
        }
        if seq > 1 {
            let have = match self.chain() {
                Ok(Some((c, files))) => {
                    if c == chain && files.len() as u64 == seq - 1 {
                        None
                    } else {
                        Some(format!("chain {c} up to checkpoint {}", files.len()))
                    }
                }
                Ok(None) | Err(ReplicaError::Empty) => Some("nothing".to_string()),
                Err(e) => return Err(e),
            };
            if let Some(have) = have {
                return Err(ReplicaError::NotNext {
                    chain: chain.to_string(),
                    seq,
                    have,
                });
            }
        }
        self.remove_temps();
        let temp = self.dir.join(format!(".incoming-{}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&temp)?;
        Ok(Incoming {
            dir: self.dir.clone(),
            temp,
            file: Some(file),
            chain: chain.to_string(),
            seq,
        })
    }

    fn remove_temps(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".incoming-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Removes every checkpoint file not of `chain`.
    fn remove_other_chains(&self, chain: &str) -> Result<(), ReplicaError> {
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(&format!(".{EXT}")) && !name.starts_with(&format!("{chain}-")) {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }
}

impl Write for Incoming {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(std::io::Error::other("the checkpoint was committed")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), Write::flush)
    }
}

impl Incoming {
    /// Syncs the checkpoint and renames it into place; for the first of a chain, then makes
    /// that chain the kept one and removes the others.
    pub fn commit(mut self) -> Result<(), ReplicaError> {
        let file = self.file.take().ok_or(ReplicaError::Malformed)?;
        file.sync_all()?;
        drop(file);
        let replica = ReplicaDir::new(&self.dir);
        std::fs::rename(&self.temp, replica.file(&self.chain, self.seq))?;
        hostfs::sync_dir(&self.dir)?;
        if self.seq == 1 {
            hostfs::write_atomic(
                &self.dir.join(CURRENT),
                format!("{}\n", self.chain).as_bytes(),
            )?;
            replica.remove_other_chains(&self.chain)?;
            hostfs::sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    fn store(r: &ReplicaDir, chain: &str, seq: u64, data: &[u8]) -> Result<(), ReplicaError> {
        let mut i = r.begin(chain, seq)?;
        i.write_all(data)?;
        i.commit()
    }

    fn contents(r: &ReplicaDir) -> (String, Vec<Vec<u8>>) {
        let (c, files) = r.chain().unwrap().unwrap();
        (c, files.iter().map(|f| std::fs::read(f).unwrap()).collect())
    }

    #[test]
    fn a_chain_grows_in_order_and_a_new_full_one_replaces_it_once_whole() {
        let dir = tempfile::tempdir().unwrap();
        let r = ReplicaDir::new(dir.path());
        assert!(r.chain().unwrap().is_none());
        // Nothing to follow yet.
        assert!(matches!(
            store(&r, A, 2, b"x"),
            Err(ReplicaError::NotNext { .. })
        ));
        store(&r, A, 1, b"full").unwrap();
        store(&r, A, 2, b"delta").unwrap();
        // Not the next one, or of another chain: refused, the chain unchanged.
        assert!(matches!(
            store(&r, A, 2, b"again"),
            Err(ReplicaError::NotNext { .. })
        ));
        assert!(matches!(
            store(&r, A, 4, b"gap"),
            Err(ReplicaError::NotNext { .. })
        ));
        assert!(matches!(
            store(&r, B, 3, b"other"),
            Err(ReplicaError::NotNext { .. })
        ));
        assert_eq!(
            contents(&r),
            (A.into(), vec![b"full".to_vec(), b"delta".to_vec()])
        );
        // A new chain being received leaves the old one whole until it is committed.
        let mut i = r.begin(B, 1).unwrap();
        i.write_all(b"half of a new full").unwrap();
        assert_eq!(contents(&r).0, A);
        drop(i);
        assert_eq!(
            contents(&r),
            (A.into(), vec![b"full".to_vec(), b"delta".to_vec()])
        );
        store(&r, B, 1, b"new full").unwrap();
        assert_eq!(contents(&r), (B.into(), vec![b"new full".to_vec()]));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_receive_killed_midway_leaves_the_chain_and_its_temp_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let r = ReplicaDir::new(dir.path());
        store(&r, A, 1, b"full").unwrap();
        // As a killed process leaves it: a temporary file, never renamed.
        std::fs::write(dir.path().join(".incoming-99999"), b"partial").unwrap();
        assert_eq!(contents(&r), (A.into(), vec![b"full".to_vec()]));
        store(&r, A, 2, b"delta").unwrap();
        assert!(!dir.path().join(".incoming-99999").exists());
        assert_eq!(contents(&r).1.len(), 2);
    }

    #[test]
    fn malformed_chain_ids_and_numbers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = ReplicaDir::new(dir.path());
        for (c, s) in [
            (A, 0),
            ("../x", 1),
            (&A[..31], 1),
            ("0123456789ABCDEF0123456789abcdef", 1),
        ] {
            assert!(
                matches!(r.begin(c, s), Err(ReplicaError::Malformed)),
                "{c} {s}"
            );
        }
    }
}
