//! pocketvisor release versions (`MAJOR.MINOR.PATCH`) for the boot section's minimum.

use std::fmt;
use std::str::FromStr;

/// A release version, ordered numerically part by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u64, pub u64, pub u64);

/// This build's version.
pub fn this_build() -> Version {
    env!("CARGO_PKG_VERSION")
        .parse()
        .unwrap_or(Version(0, 0, 0))
}

impl FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<u64> = s
            .split('.')
            .map(|p| p.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("{s:?} is not a version like 0.1.0"))?;
        match parts[..] {
            [a, b, c] => Ok(Version(a, b, c)),
            _ => Err(format!("{s:?} is not a version like 0.1.0")),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert!(v("0.10.0") > v("0.9.9"));
        assert!(v("1.0.0") > v("0.99.99"));
        assert!("1.0".parse::<Version>().is_err());
        assert!("1.x.0".parse::<Version>().is_err());
        assert_eq!(this_build().to_string(), env!("CARGO_PKG_VERSION"));
    }
}
