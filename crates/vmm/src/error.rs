//! Errors of the VMM crate.

/// Everything that can stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm ({0}); is KVM available and do you have access to it?")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate guest memory: {0}")]
    Memory(String),
    /// A file named in the configuration could not be opened.
    #[error("cannot open {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The kernel could not be loaded or the vCPUs set up.
    #[error(transparent)]
    Arch(#[from] arch::Error),
    /// A device could not be created.
    #[error("device {name}: {reason}")]
    Device { name: String, reason: String },
    /// A vCPU stopped with an error.
    #[error("vCPU {id}: {reason}")]
    Vcpu { id: u8, reason: String },
    /// A snapshot could not be written or read.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A live migration failed or was refused.
    #[error("migration: {0}")]
    Migration(String),
    /// A replica's checkpoint could not be taken, or a chain of them not recovered.
    #[error("replica: {0}")]
    Replica(String),
    /// A snapshot's state file is malformed, corrupted or of another format version.
    #[error(transparent)]
    Format(#[from] crate::snapshot::format::FormatError),
    /// A host call failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}
