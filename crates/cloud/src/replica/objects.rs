//! Checkpoints as objects in an object store, through the `object_store` crate:
//! `<device hex>/<name>/current` and `<device hex>/<name>/<chain>-<seq>.pvr`.
//!
//! A checkpoint is a multipart upload, visible only once completed (object_store's local-file
//! backend writes a staging file and renames it; S3 shows an object when its upload
//! completes); `current` is one atomic put. object_store is async: the store owns a small
//! current-thread tokio runtime and blocks on it, so the sync `cloud twin` process uses it as
//! it uses files.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use tokio::runtime::Runtime;

use super::{
    check_next, checkpoint_name, of_other_chain, valid_chain, Checkpoint, OpenChain, Replica,
    ReplicaError, CURRENT,
};
use crate::store::DeviceId;

/// The size of an upload's parts (S3 takes 5 MiB and more, but the last).
pub(super) const PART: usize = 8 << 20;
/// The most `current` object read.
const MAX_CURRENT: usize = 4096;

/// Replicas kept in an object store.
pub struct ObjectReplicas {
    store: Arc<dyn ObjectStore>,
    /// The same store when it is the local-file backend, whose staging files this host
    /// sweeps.
    local: Option<Arc<LocalFileSystem>>,
    rt: Arc<Runtime>,
}

/// One replica's objects.
pub struct ObjectReplica<'a> {
    objects: &'a ObjectReplicas,
    prefix: Path,
}

/// A checkpoint being uploaded.
struct Upload<'a> {
    objects: &'a ObjectReplicas,
    prefix: Path,
    writer: Option<WriteMultipart>,
    chain: String,
    seq: u64,
}

/// A stored checkpoint being read.
struct ObjectReader {
    rt: Arc<Runtime>,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    chunk: Bytes,
}

fn bad_url(url: &str, why: &str) -> ReplicaError {
    ReplicaError::BadUrl {
        url: url.to_string(),
        why: why.to_string(),
    }
}

impl ObjectReplicas {
    /// Replicas in `store`, with a runtime of their own.
    pub fn new(store: Arc<dyn ObjectStore>) -> Result<ObjectReplicas, ReplicaError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(ObjectReplicas {
            store,
            local: None,
            rt: Arc::new(rt),
        })
    }

    /// `file:///ABS/DIR`: object_store's local-file backend under DIR (which exists), each
    /// write synced.
    pub fn from_url(url: &str) -> Result<ObjectReplicas, ReplicaError> {
        let Some(dir) = url.strip_prefix("file://") else {
            return Err(bad_url(
                url,
                "this host takes file:///ABS/DIR (an S3 store needs object_store's `aws` \
                 feature: docs/deploy.md)",
            ));
        };
        if !dir.starts_with('/') {
            return Err(bad_url(
                url,
                "the directory must be absolute: file:///ABS/DIR",
            ));
        }
        if dir.contains(['%', '?', '#']) {
            return Err(bad_url(
                url,
                "no percent-encoding, query or fragment is taken",
            ));
        }
        if !std::path::Path::new(dir).is_dir() {
            return Err(bad_url(url, "no such directory"));
        }
        let local = Arc::new(
            LocalFileSystem::new_with_prefix(dir)?
                .with_fsync(true)
                .with_automatic_cleanup(true),
        );
        Ok(ObjectReplicas {
            local: Some(local.clone()),
            ..ObjectReplicas::new(local)?
        })
    }

    /// The replica `name` of `device` (a name [`crate::store::valid_name`] takes).
    pub fn replica(&self, device: &DeviceId, name: &str) -> ObjectReplica<'_> {
        ObjectReplica {
            objects: self,
            prefix: Path::from_iter([device.hex(), name.to_string()]),
        }
    }
}

impl ObjectReplica<'_> {
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.objects.rt.block_on(f)
    }

    /// The names of this replica's objects (not those of a replica whose name it prefixes).
    fn names(&self) -> Result<HashSet<String>, ReplicaError> {
        let metas: Vec<_> =
            self.block_on(self.objects.store.list(Some(&self.prefix)).try_collect())?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let mut rest = m.location.prefix_match(&self.prefix)?;
                let name = rest.next()?.as_ref().to_string();
                rest.next().is_none().then_some(name)
            })
            .collect())
    }
}

/// Whether `name` is the local-file backend's staging file of an upload: `<name>#<digits>`.
fn is_staged(name: &str) -> bool {
    name.rsplit_once('#')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl ObjectReplica<'_> {
    /// Removes the staging files of uploads a killed process left, on the local-file backend
    /// (one receive at a time: the caller holds the twin's lock). An S3 bucket has a lifecycle
    /// rule for them instead.
    fn remove_staged(&self) {
        let Some(dir) =
            (self.objects.local.as_ref()).and_then(|l| l.path_to_filesystem(&self.prefix).ok())
        else {
            return;
        };
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if is_staged(&e.file_name().to_string_lossy()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Replica for ObjectReplica<'_> {
    fn chain(&self) -> Result<Option<(String, u64)>, ReplicaError> {
        let store = &self.objects.store;
        let current = self.block_on(async {
            let got = store.get(&self.prefix.clone().join(CURRENT)).await?;
            if got.meta.size > MAX_CURRENT as u64 {
                return Ok(None);
            }
            got.bytes().await.map(Some)
        });
        let chain = match current {
            Ok(Some(b)) => std::str::from_utf8(&b)
                .map_err(|_| ReplicaError::Malformed)?
                .trim()
                .to_string(),
            Ok(None) => return Err(ReplicaError::Malformed),
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if !valid_chain(&chain) {
            return Err(ReplicaError::Malformed);
        }
        let names = self.names()?;
        let mut n = 0;
        while names.contains(&checkpoint_name(&chain, n + 1)) {
            n += 1;
        }
        if n == 0 {
            return Err(ReplicaError::Empty);
        }
        Ok(Some((chain, n)))
    }

    fn open_chain(&self) -> Result<Option<OpenChain>, ReplicaError> {
        let Some((chain, n)) = self.chain()? else {
            return Ok(None);
        };
        let mut readers: Vec<Box<dyn Read + Send>> = Vec::new();
        for seq in 1..=n {
            let key = self.prefix.clone().join(checkpoint_name(&chain, seq));
            // Opened (the local backend: the file open) before any is sent.
            let got = self.block_on(self.objects.store.get(&key))?;
            readers.push(Box::new(ObjectReader {
                rt: self.objects.rt.clone(),
                stream: got.into_stream(),
                chunk: Bytes::new(),
            }));
        }
        Ok(Some((chain, readers)))
    }

    fn begin(&self, chain: &str, seq: u64) -> Result<Box<dyn Checkpoint + '_>, ReplicaError> {
        check_next(self, chain, seq)?;
        self.remove_staged();
        let key = self.prefix.clone().join(checkpoint_name(chain, seq));
        let upload = self.block_on(self.objects.store.put_multipart(&key))?;
        Ok(Box::new(Upload {
            objects: self.objects,
            prefix: self.prefix.clone(),
            writer: Some(WriteMultipart::new_with_chunk_size(upload, PART)),
            chain: chain.to_string(),
            seq,
        }))
    }
}

impl Write for Upload<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let w = self
            .writer
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the checkpoint was committed"))?;
        // A full part is sent as a task of the runtime, which runs while it is blocked on.
        let _in_runtime = self.objects.rt.enter();
        w.write(buf);
        self.objects
            .rt
            .block_on(w.wait_for_capacity(1))
            .map_err(std::io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Checkpoint for Upload<'_> {
    fn commit(mut self: Box<Self>) -> Result<(), ReplicaError> {
        let w = self.writer.take().ok_or(ReplicaError::Malformed)?;
        let rt = &self.objects.rt;
        let store = &self.objects.store;
        {
            let _in_runtime = rt.enter();
            rt.block_on(w.finish())?;
        }
        if self.seq == 1 {
            let current = format!("{}\n", self.chain).into_bytes();
            rt.block_on(store.put(&self.prefix.clone().join(CURRENT), current.into()))?;
            let replica = ObjectReplica {
                objects: self.objects,
                prefix: self.prefix.clone(),
            };
            for name in replica.names()? {
                if of_other_chain(&name, &self.chain) {
                    rt.block_on(store.delete(&self.prefix.clone().join(name)))?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            let _in_runtime = self.objects.rt.enter();
            let _ = self.objects.rt.block_on(w.abort());
        }
    }
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}
