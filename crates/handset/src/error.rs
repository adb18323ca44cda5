//! The handset's error type; each variant maps to one HTTP status.

/// Why a handset operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or a value is out of range (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such profile (404).
    #[error("no profile named {0:?}")]
    NotFound(String),
    /// The profile is in the wrong state for the operation, or already exists (409).
    #[error("{0}")]
    Conflict(String),
    /// The route switches protocols and the request did not ask to (426).
    #[error("{0}")]
    UpgradeRequired(String),
    /// The profile's IT policy refuses it (403).
    #[error("{0}")]
    Denied(String),
    /// The database failed (500).
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A host operation failed (500).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The VMM failed or refused (500).
    #[error("vmm: {0}")]
    Vmm(String),
    /// Anything else (500).
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// An [`Error::Io`] builder for `map_err`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// The HTTP status code for this error.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) => 400,
            Error::Denied(_) => 403,
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::UpgradeRequired(_) => 426,
            _ => 500,
        }
    }
}

/// The handset's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
