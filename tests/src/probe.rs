//! Parsing the probe guest's serial protocol (`guest/probe/PROTOCOL.md`).
//!
//! Every result line starts with `PROBE `, followed by words and `key=value` fields,
//! where a value may be double-quoted (`rx="pocketvisor-probe-net"`, with `\"` and `\\`
//! escapes inside the quotes).

use std::collections::BTreeMap;

/// One `PROBE ...` line split into its words and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeLine {
    /// The whole line as printed, without the line ending.
    pub raw: String,
    /// Tokens without `=`, in order (`["blk", "ok"]`).
    pub words: Vec<String>,
    /// `key=value` tokens, with quotes removed from values.
    pub fields: BTreeMap<String, String>,
}

impl ProbeLine {
    /// Parses one serial line; `None` unless it is a `PROBE ` line.
    pub fn parse(line: &str) -> Option<ProbeLine> {
        let line = line.trim_end_matches(['\r', '\n']);
        let rest = line.strip_prefix("PROBE ")?;
        let mut words = Vec::new();
        let mut fields = BTreeMap::new();
        for token in tokenize(rest) {
            match token.split_once('=') {
                Some((key, value)) if !key.is_empty() && !key.contains('"') => {
                    fields.insert(key.to_string(), unquote(value));
                }
                _ => words.push(unquote(&token)),
            }
        }
        Some(ProbeLine {
            raw: line.to_string(),
            words,
            fields,
        })
    }

    /// The first word (`blk`, `cpu`, `done`, ...), or "" for an empty line.
    pub fn topic(&self) -> &str {
        self.words.first().map(String::as_str).unwrap_or("")
    }

    /// Whether the line's words begin with `prefix`.
    pub fn starts_with(&self, prefix: &[&str]) -> bool {
        prefix.len() <= self.words.len() && prefix.iter().zip(&self.words).all(|(a, b)| a == b)
    }

    /// A field's value.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// A field parsed as a decimal (or `0x` hexadecimal) integer.
    pub fn field_u64(&self, key: &str) -> Option<u64> {
        let value = self.field(key)?;
        match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => value.parse().ok(),
        }
    }

    /// A field that must exist, with a message naming the line when it does not.
    pub fn expect_field(&self, key: &str) -> &str {
        self.field(key)
            .unwrap_or_else(|| panic!("PROBE line has no field {key:?}: {}", self.raw))
    }
}

/// Splits on spaces, keeping double-quoted runs (with escapes) inside one token.
fn tokenize(s: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_quotes => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '"' => {
                in_quotes = !in_quotes;
                current.push(c);
            }
            ' ' | '\t' if !in_quotes => {
                if !current.is_empty() {
                    tokens.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

/// Removes surrounding double quotes and resolves `\"` and `\\` inside them.
fn unquote(s: &str) -> String {
    let Some(inner) = s
        .strip_prefix('"')
        .map(|t| t.strip_suffix('"').unwrap_or(t))
    else {
        return s.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// All `PROBE` lines of one guest run.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    /// The lines in the order the guest printed them.
    pub lines: Vec<ProbeLine>,
}

impl ProbeReport {
    /// Collects the `PROBE` lines among `lines`, ignoring everything else.
    pub fn from_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> ProbeReport {
        ProbeReport {
            lines: lines.into_iter().filter_map(ProbeLine::parse).collect(),
        }
    }

    /// The first line whose words begin with `prefix`.
    pub fn find(&self, prefix: &[&str]) -> Option<&ProbeLine> {
        self.lines.iter().find(|l| l.starts_with(prefix))
    }

    /// Every line whose words begin with `prefix`.
    pub fn find_all(&self, prefix: &[&str]) -> Vec<&ProbeLine> {
        self.lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// The first line beginning with `prefix`; panics with the whole report otherwise.
    pub fn expect(&self, prefix: &[&str]) -> &ProbeLine {
        self.find(prefix).unwrap_or_else(|| {
            panic!(
                "no `PROBE {}` line; the guest printed:\n{}",
                prefix.join(" "),
                self.dump()
            )
        })
    }

    /// Whether the guest finished its selftest with `PROBE done ok`.
    pub fn done_ok(&self) -> bool {
        self.find(&["done", "ok"]).is_some()
    }

    /// The `PROBE` lines, one per line, for failure messages.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            out.push_str(&line.raw);
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_words_and_fields() {
        let l = ProbeLine::parse(
            "PROBE blk ok capacity=2048 ro=0 sector0_fnv=cbf29ce484222325 wrote=8\r",
        )
        .unwrap();
        assert_eq!(l.topic(), "blk");
        assert_eq!(l.words, vec!["blk", "ok"]);
        assert_eq!(l.field_u64("capacity"), Some(2048));
        assert_eq!(l.field("sector0_fnv"), Some("cbf29ce484222325"));
        assert_eq!(l.field_u64("wrote"), Some(8));
        assert!(l.starts_with(&["blk", "ok"]));
        assert!(!l.starts_with(&["blk", "ro-refused"]));
        assert!(!l.raw.ends_with('\r'));
    }

    #[test]
    fn quoted_values_keep_spaces_and_escapes() {
        let l = ProbeLine::parse(r#"PROBE boot ok cmdline="pv.tests=blk pv.x=\"q\" end" after=1"#)
            .unwrap();
        assert_eq!(l.field("cmdline"), Some(r#"pv.tests=blk pv.x="q" end"#));
        assert_eq!(l.field("after"), Some("1"));
        assert_eq!(l.words, vec!["boot", "ok"]);
    }

    #[test]
    fn net_rx_none_and_payload() {
        let l =
            ProbeLine::parse(r#"PROBE net ok mac=52:54:00:12:34:56 sent=1 rx="hi there""#).unwrap();
        assert_eq!(l.field("rx"), Some("hi there"));
        assert_eq!(l.field("mac"), Some("52:54:00:12:34:56"));
        let l = ProbeLine::parse("PROBE net ok mac=aa sent=1 rx=none").unwrap();
        assert_eq!(l.field("rx"), Some("none"));
    }

    #[test]
    fn non_probe_lines_are_ignored() {
        assert!(ProbeLine::parse("PROBES x").is_none());
        assert!(ProbeLine::parse("  PROBE x").is_none());
        assert!(ProbeLine::parse("SeaBIOS").is_none());
        let r = ProbeReport::from_lines(
            [
                "noise",
                "PROBE ready",
                "PROBE cpu 1 up apic=1",
                "PROBE done ok",
            ]
            .iter()
            .copied(),
        );
        assert_eq!(r.lines.len(), 3);
        assert!(r.done_ok());
        assert_eq!(r.find(&["cpu"]).unwrap().words, vec!["cpu", "1", "up"]);
        assert_eq!(r.find(&["cpu"]).unwrap().field_u64("apic"), Some(1));
    }

    #[test]
    fn done_fail_is_not_ok() {
        let r = ProbeReport::from_lines(["PROBE done fail=2"].iter().copied());
        assert!(!r.done_ok());
        assert_eq!(r.expect(&["done"]).field_u64("fail"), Some(2));
    }

    #[test]
    fn hex_fields_parse() {
        let l = ProbeLine::parse("PROBE pci dev=0x1042 n=12").unwrap();
        assert_eq!(l.field_u64("dev"), Some(0x1042));
        assert_eq!(l.field_u64("n"), Some(12));
    }
}
