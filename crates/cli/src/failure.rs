//! The exit statuses of failed commands, by kind of failure (documented in `--help` and the
//! README): scripts can tell "not found" and "refused by policy" from other failures.

use handset::client::ClientError;

/// Anything else that failed.
pub const FAILURE: i32 = 1;
/// A bad command line (clap's status too).
pub const USAGE: i32 = 2;
/// No such profile, file or path.
pub const NOT_FOUND: i32 = 3;
/// Refused by policy (a transfer the profiles' channels do not allow, a start the profile's IT
/// policy does not allow) or a policy refused (unsigned, wrongly signed, expired, rolled back).
pub const DENIED: i32 = 4;

/// A failure of a known kind, for errors that do not come from the daemon's answers.
#[derive(Debug)]
pub enum Failure {
    /// No such profile, file or path.
    NotFound(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotFound(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Failure {}

/// The exit status for `e`: the kind of its first cause that has one, else [`FAILURE`].
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(ClientError::Api { status, .. }) = cause.downcast_ref::<ClientError>() {
            return match status {
                404 => NOT_FOUND,
                403 => DENIED,
                _ => FAILURE,
            };
        }
        match cause.downcast_ref::<handset::Error>() {
            Some(handset::Error::Denied(_)) => return DENIED,
            Some(handset::Error::NotFound(_)) => return NOT_FOUND,
            _ => {}
        }
        if let Some(
            policy::PolicyError::Signature(_)
            | policy::PolicyError::Expired { .. }
            | policy::PolicyError::Rollback { .. },
        ) = cause.downcast_ref::<policy::PolicyError>()
        {
            return DENIED;
        }
        if let Some(Failure::NotFound(_)) = cause.downcast_ref::<Failure>() {
            return NOT_FOUND;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::NotFound {
                return NOT_FOUND;
            }
        }
    }
    FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_their_statuses() {
        let api = |status| {
            anyhow::Error::new(ClientError::Api {
                status,
                message: "m".into(),
            })
        };
        assert_eq!(exit_code(&api(404)), NOT_FOUND);
        assert_eq!(exit_code(&api(403)), DENIED);
        assert_eq!(exit_code(&api(409)), FAILURE);
        let nf = anyhow::Error::new(Failure::NotFound("x".into())).context("while y");
        assert_eq!(exit_code(&nf), NOT_FOUND);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), FAILURE);
    }
}
