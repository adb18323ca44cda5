//! The strings the protocol carries besides data: file names and MIME types.

/// Longest file name.
pub const NAME_MAX: usize = 128;
/// Longest MIME type.
pub const MIME_MAX: usize = 64;
/// The MIME type of a clipboard set without one.
pub const DEFAULT_MIME: &str = "text/plain";

/// File names: 1..=[`NAME_MAX`] of `[A-Za-z0-9._-]`, not starting with `.`, without `..`
/// (so never a path, nor hidden, nor special).
pub fn valid_file_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= NAME_MAX
        && b[0] != b'.'
        && !b.windows(2).any(|w| w == b"..")
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// MIME types: 1..=[`MIME_MAX`] of `[A-Za-z0-9/+.;=-]`.
pub fn valid_mime(m: &str) -> bool {
    let b = m.as_bytes();
    !b.is_empty()
        && b.len() <= MIME_MAX
        && b.iter().all(|&c| {
            c.is_ascii_alphanumeric() || matches!(c, b'/' | b'+' | b'.' | b';' | b'=' | b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_mimes() {
        for ok in ["x.txt", "Report_2024-01.pdf", "a", "a.b-c_d"] {
            assert!(valid_file_name(ok), "{ok}");
        }
        let long = [b'a'; 129];
        let long = core::str::from_utf8(&long).unwrap();
        for bad in [
            "",
            ".hidden",
            "..",
            "a/b",
            "a..b",
            "a b",
            "é",
            "/etc/passwd",
            long,
        ] {
            assert!(!valid_file_name(bad), "{bad}");
        }
        assert!(valid_file_name(&long[..128]));
        assert!(valid_mime("text/plain;charset=utf-8"));
        for bad in ["text plain", "", "a\"b", "x\\y"] {
            assert!(!valid_mime(bad), "{bad}");
        }
    }
}
