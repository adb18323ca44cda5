//! The one error type of the crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while writing or reading a portable profile file.
///
/// Each variant carries one clear, user-facing message.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The file does not start with the portable profile magic.
    #[error("not a pocketvisor portable profile file (bad magic)")]
    NotAPortableProfile,

    /// The file uses a format version this build does not read.
    #[error(
        "unsupported portable profile format version {found} (this pocketvisor reads version \
         {supported}; the file was probably made by a newer pocketvisor)"
    )]
    UnsupportedVersion {
        /// Version found in the file.
        found: u16,
        /// Version this build reads and writes.
        supported: u16,
    },

    /// The file names a cipher this build does not know.
    #[error("the file is encrypted with an unsupported cipher (id {id})")]
    UnsupportedCipher {
        /// Cipher id found in the header.
        id: u8,
    },

    /// No key slot of the file opens with the given passphrase or identity.
    #[error("wrong passphrase or key: no key slot opens this file")]
    WrongKey,

    /// The header is malformed or failed its authentication check.
    #[error("the file header is corrupt or was tampered with: {reason}")]
    CorruptHeader {
        /// What exactly was wrong.
        reason: String,
    },

    /// A chunk failed authentication or decompression, or the decrypted stream is malformed.
    #[error("the file is corrupt or was tampered with at chunk {chunk}: {reason}")]
    Corrupt {
        /// Index of the chunk (0-based) where the problem was detected.
        chunk: u64,
        /// What exactly was wrong.
        reason: String,
    },

    /// The file ended before its last chunk.
    #[error("the file is truncated (it ends before its last chunk)")]
    Truncated,

    /// There are bytes after the last chunk.
    #[error("the file has unexpected data after its last chunk")]
    TrailingData,

    /// The decrypted manifest is not valid.
    #[error("the file's manifest is invalid: {reason}")]
    BadManifest {
        /// What exactly was wrong.
        reason: String,
    },

    /// The caller passed arguments that cannot be exported (bad entry name, no keys, ...).
    #[error("invalid export request: {reason}")]
    InvalidInput {
        /// What exactly was wrong.
        reason: String,
    },

    /// A key in text form could not be parsed.
    #[error("invalid key text: {reason}")]
    BadKeyText {
        /// What exactly was wrong.
        reason: &'static str,
    },

    /// The import destination already exists.
    #[error("the import destination {} already exists", path.display())]
    DestinationExists {
        /// The destination directory.
        path: PathBuf,
    },

    /// The caller asked to stop (`ExportOptions::cancel`); nothing was written.
    #[error("interrupted")]
    Interrupted,

    /// An operating-system level I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl VaultError {
    /// Wraps an I/O error with a short description of the operation.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        VaultError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn corrupt_header(reason: impl Into<String>) -> Self {
        VaultError::CorruptHeader {
            reason: reason.into(),
        }
    }

    pub(crate) fn bad_manifest(reason: impl Into<String>) -> Self {
        VaultError::BadManifest {
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_input(reason: impl Into<String>) -> Self {
        VaultError::InvalidInput {
            reason: reason.into(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = VaultError> = std::result::Result<T, E>;
