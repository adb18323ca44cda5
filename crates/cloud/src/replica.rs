//! A replica's checkpoints at the cloud host: sealed files (the device encrypted them; this
//! host cannot read them), one chain at a time, kept by a [`ReplicaStore`]: the replica
//! twin's directory ([`dir`], the default) or an object store ([`objects`], `cloud serve
//! --replica-store URL`).
//!
//! ```text
//! current                  the chain being kept: 32 hexadecimal digits
//! <chain>-<seq>.pvr        its checkpoints, seq 1 (full) to N, 8 decimal digits
//! ```
//!
//! Both keep the same promise: a checkpoint is visible only once whole (a file renamed into
//! place, an object whose upload completed), and `current` is replaced only once the first
//! checkpoint of a new chain is whole, the old chain's checkpoints removed after that. So a
//! host killed at any point keeps the last whole chain.

pub mod dir;
pub mod objects;

use std::io::{Read, Write};
use std::path::Path;

use crate::store::{valid_name, DeviceId};

pub use dir::ReplicaDir;
pub use objects::ObjectReplicas;

/// The object naming the chain being kept.
const CURRENT: &str = "current";
/// A checkpoint's extension.
const EXT: &str = "pvr";
/// The largest checkpoint a host accepts.
pub const MAX_CHECKPOINT: u64 = 64 << 30;

/// Why a checkpoint was not stored or a chain not read.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A file could not be written, synced, renamed or read.
    #[error("replica storage: {0}")]
    Io(#[from] std::io::Error),
    /// The object store failed.
    #[error("replica object store: {0}")]
    Objects(#[from] object_store::Error),
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
    /// A chain id that is not 32 lower-case hexadecimal digits, a sequence number of 0 or a
    /// bad replica name.
    #[error("a malformed chain id, checkpoint number or replica name")]
    Malformed,
    /// Nothing is stored.
    #[error("no checkpoint is stored")]
    Empty,
    /// A `--replica-store` URL this host does not take.
    #[error("replica store {url:?}: {why}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Whether `chain` is a chain id: 32 lower-case hexadecimal digits.
pub fn valid_chain(chain: &str) -> bool {
    chain.len() == 32
        && chain
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The name of checkpoint `seq` of `chain`.
fn checkpoint_name(chain: &str, seq: u64) -> String {
    format!("{chain}-{seq:08}.{EXT}")
}

/// Whether `name` is a checkpoint of a chain other than `chain`.
fn of_other_chain(name: &str, chain: &str) -> bool {
    name.ends_with(&format!(".{EXT}")) && !name.starts_with(&format!("{chain}-"))
}

/// A stored chain read for sending: its id and its checkpoints, oldest first, already
/// opened (a new chain stored meanwhile does not change them).
pub type OpenChain = (String, Vec<Box<dyn Read + Send>>);

/// One replica's checkpoints, wherever they are kept.
pub trait Replica {
    /// The chain kept and its number of whole checkpoints (the run from 1); None if nothing
    /// is stored.
    fn chain(&self) -> Result<Option<(String, u64)>, ReplicaError>;

    /// The chain kept, opened for reading; None if nothing is stored.
    fn open_chain(&self) -> Result<Option<OpenChain>, ReplicaError>;

    /// Starts receiving checkpoint `seq` of `chain`: seq 1 starts a new chain (the stored one
    /// stays until it is whole); any other must be the next of the stored chain. One receive
    /// at a time: the caller holds the twin's lock.
    fn begin(&self, chain: &str, seq: u64) -> Result<Box<dyn Checkpoint + '_>, ReplicaError>;
}

/// A checkpoint being received: visible only after [`Checkpoint::commit`], discarded if
/// dropped before.
pub trait Checkpoint: Write {
    /// Puts the checkpoint in place (durably); for the first of a chain, then makes that
    /// chain the kept one and removes the others.
    fn commit(self: Box<Self>) -> Result<(), ReplicaError>;
}

/// Refuses `seq` of `chain` unless it may follow what `replica` keeps.
fn check_next(replica: &dyn Replica, chain: &str, seq: u64) -> Result<(), ReplicaError> {
    if !valid_chain(chain) || seq == 0 {
        return Err(ReplicaError::Malformed);
    }
    if seq == 1 {
        return Ok(());
    }
    let have = match replica.chain() {
        Ok(Some((c, n))) if c == chain && n == seq - 1 => return Ok(()),
        Ok(Some((c, n))) => format!("chain {c} up to checkpoint {n}"),
        Ok(None) | Err(ReplicaError::Empty) => "nothing".to_string(),
        Err(e) => return Err(e),
    };
    Err(ReplicaError::NotNext {
        chain: chain.to_string(),
        seq,
        have,
    })
}

/// Where a cloud host keeps its replicas' checkpoints.
pub enum ReplicaStore {
    /// Files in each replica twin's directory.
    TwinDirs,
    /// Objects `<device hex>/<name>/...` in an object store.
    Objects(ObjectReplicas),
}

impl ReplicaStore {
    /// The store a `--replica-store` URL names: `file:///ABS/DIR` (an existing directory)
    /// for object_store's local-file backend under DIR.
    pub fn from_url(url: &str) -> Result<ReplicaStore, ReplicaError> {
        Ok(ReplicaStore::Objects(ObjectReplicas::from_url(url)?))
    }

    /// The replica `name` of `device`, whose twin directory is `twin_dir`; another device's
    /// replica of the same name is another one.
    pub fn replica<'a>(
        &'a self,
        device: &DeviceId,
        name: &str,
        twin_dir: &Path,
    ) -> Result<Box<dyn Replica + 'a>, ReplicaError> {
        if !valid_name(name) {
            return Err(ReplicaError::Malformed);
        }
        Ok(match self {
            ReplicaStore::TwinDirs => Box::new(ReplicaDir::new(twin_dir)),
            ReplicaStore::Objects(o) => Box::new(o.replica(device, name)),
        })
    }
}

#[cfg(test)]
mod tests;
