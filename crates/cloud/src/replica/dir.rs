//! Checkpoints as files in the replica twin's directory (the default store).
//!
//! A checkpoint is written as `.incoming-<pid>`, synced and renamed; `current` is replaced
//! with a temporary file, sync and rename.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{
    check_next, checkpoint_name, of_other_chain, valid_chain, Checkpoint, OpenChain, Replica,
    ReplicaError, CURRENT,
};

/// The checkpoints of one replica twin, in its directory.
pub struct ReplicaDir {
    dir: PathBuf,
}

/// A checkpoint being received into a temporary file of the twin's directory.
struct Incoming {
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
        self.dir.join(checkpoint_name(chain, seq))
    }

    /// The chain kept and its checkpoints' files, 1 to N in order.
    fn files(&self) -> Result<Option<(String, Vec<PathBuf>)>, ReplicaError> {
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
            if of_other_chain(&e.file_name().to_string_lossy(), chain) {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }
}

impl Replica for ReplicaDir {
    fn chain(&self) -> Result<Option<(String, u64)>, ReplicaError> {
        Ok(self.files()?.map(|(c, f)| (c, f.len() as u64)))
    }

    fn open_chain(&self) -> Result<Option<OpenChain>, ReplicaError> {
        let Some((chain, paths)) = self.files()? else {
            return Ok(None);
        };
        // Opened first: a new chain stored meanwhile removes the files, not what is open.
        let files = paths
            .iter()
            .map(|p| File::open(p).map(|f| Box::new(f) as Box<dyn Read + Send>))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Some((chain, files)))
    }

    /// A temporary file left by a killed receive is removed first.
    fn begin(&self, chain: &str, seq: u64) -> Result<Box<dyn Checkpoint + '_>, ReplicaError> {
        check_next(self, chain, seq)?;
        self.remove_temps();
        let temp = self.dir.join(format!(".incoming-{}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&temp)?;
        Ok(Box::new(Incoming {
            dir: self.dir.clone(),
            temp,
            file: Some(file),
            chain: chain.to_string(),
            seq,
        }))
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

impl Checkpoint for Incoming {
    fn commit(mut self: Box<Self>) -> Result<(), ReplicaError> {
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
