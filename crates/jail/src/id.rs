//! Jail ids: they name directories and cgroups, so only a safe alphabet is accepted.

use crate::{Error, Result};

/// The longest id accepted (Firecracker's limit too).
pub const MAX_LEN: usize = 64;

/// Accepts `[a-z0-9-]{1,64}` that is not `-`-only at the start (no option look-alikes).
pub fn validate(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_LEN
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_the_safe_alphabet() {
        for good in ["a", "work", "profile-2", "0", &"x".repeat(64)] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Work",
            "a/b",
            "..",
            ".",
            "a b",
            "-rf",
            "é",
            "a\0b",
            &"x".repeat(65),
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }
}
