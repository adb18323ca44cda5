//! Why a request was refused.

use core::fmt;

/// A protocol error: the agent answers it as `{"ok":false,"error":"<message>"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// The line is not a flat JSON object of plain strings (the reason).
    Syntax(&'static str),
    /// A field the protocol does not know.
    UnknownField,
    /// A field given twice.
    DuplicateField,
    /// No `op`.
    MissingOp,
    /// An `op` the protocol does not know.
    UnknownOp,
    /// No `name` where one is needed.
    MissingName,
    /// A `name` that [`crate::valid_file_name`] refuses.
    BadName,
    /// A `mime` that [`crate::valid_mime`] refuses.
    BadMime,
    /// No `data_b64` where it is needed.
    MissingData,
    /// `data_b64` is not standard padded base64.
    BadBase64,
    /// The data is larger than the agent holds.
    TooLarge {
        /// What was too large (`clipboard data`, `the file`).
        what: &'static str,
        /// The limit in bytes.
        max: usize,
    },
    /// The inbox holds its maximum number of files.
    InboxFull {
        /// That number.
        max: usize,
    },
    /// `file_get` of a name the inbox does not have.
    NoSuchFile,
    /// A request line longer than the agent reads.
    LineTooLong,
    /// A string to send holds a character the protocol does not carry (`"`, `\`, controls).
    Unencodable,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Syntax(why) => write!(f, "bad request: {why}"),
            ProtoError::UnknownField => f.write_str("bad request: unknown field"),
            ProtoError::DuplicateField => f.write_str("bad request: duplicate field"),
            ProtoError::MissingOp => f.write_str("bad request: op is missing"),
            ProtoError::UnknownOp => f.write_str("unknown op"),
            ProtoError::MissingName => f.write_str("name is missing"),
            ProtoError::BadName => f.write_str("bad file name"),
            ProtoError::BadMime => f.write_str("bad mime type"),
            ProtoError::MissingData => f.write_str("data_b64 is missing"),
            ProtoError::BadBase64 => f.write_str("data_b64 is not valid base64"),
            ProtoError::TooLarge { what, max } => write!(f, "{what} is larger than {max} bytes"),
            ProtoError::InboxFull { max } => write!(f, "the inbox is full ({max} files)"),
            ProtoError::NoSuchFile => f.write_str("no such file"),
            ProtoError::LineTooLong => f.write_str("the request line is too long"),
            ProtoError::Unencodable => {
                f.write_str("a string holds a character JSON lines here do not carry")
            }
        }
    }
}
