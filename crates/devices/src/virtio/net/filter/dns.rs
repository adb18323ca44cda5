//! Just enough DNS (RFC 1035) to learn which addresses a name resolved to: the question of a
//! query the guest sends, and the A/AAAA records of the answer it gets, following the CNAME
//! chain from the question. Everything is bounded (names, records, compression jumps) and a
//! message that does not parse is ignored: the frames are the guest's and the network's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest name (RFC 1035: 255 bytes on the wire, 253 as text).
const MAX_NAME: usize = 253;
/// Compression pointers followed in one name at most.
const MAX_JUMPS: usize = 16;
/// Records of one answer read at most.
const MAX_RECORDS: usize = 64;
/// CNAME links followed at most.
const MAX_CHAIN: usize = 8;
const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// A name pattern of a rule: `intranet.corp.example` (that name) or `*.corp.example` (every
/// name below `corp.example`, not `corp.example` itself). Lower case, no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    wildcard: bool,
    /// The name, or for a wildcard the suffix without its `*`: `.corp.example`.
    name: String,
}

impl NamePattern {
    /// Parses a pattern: labels of a-z, 0-9, `-` and `_` (1-63 each, 253 in all), the first
    /// may be `*`; case is ignored, a trailing dot too.
    pub fn parse(s: &str) -> Result<NamePattern, String> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, rest) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        if !valid_name(rest) {
            return Err(format!(
                "{s:?} is not a DNS name or *.NAME (labels of a-z, 0-9, - and _)"
            ));
        }
        Ok(NamePattern {
            wildcard,
            name: if wildcard {
                format!(".{rest}")
            } else {
                rest.to_string()
            },
        })
    }

    /// Whether `name` (lower case, as [`parse_query`] gives it) is one the pattern covers.
    pub fn matches(&self, name: &str) -> bool {
        if self.wildcard {
            name.len() > self.name.len() && name.ends_with(&self.name)
        } else {
            name == self.name
        }
    }
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            write!(f, "*{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

/// A query: its id and its one question's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The transaction id.
    pub id: u16,
    /// The name asked for, lower case.
    pub name: String,
}

/// A successful answer: its id, its question's name and the addresses the name resolved
/// to (directly or through CNAMEs) with their TTLs in seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The transaction id.
    pub id: u16,
    /// The name asked for, lower case.
    pub name: String,
    /// Addresses and TTLs.
    pub addrs: Vec<(IpAddr, u32)>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The header's id, flags and counts; the offset after the one question's name, type and
/// class, and that name.
fn header_and_question(msg: &[u8]) -> Option<(u16, u16, u16, usize, String)> {
    let id = be16(msg, 0)?;
    let flags = be16(msg, 2)?;
    let (qd, an) = (be16(msg, 4)?, be16(msg, 6)?);
    if qd != 1 {
        return None;
    }
    let (name, at) = read_name(msg, 12)?;
    let (qtype, qclass) = (be16(msg, at)?, be16(msg, at + 2)?);
    if qclass != CLASS_IN || !matches!(qtype, TYPE_A | TYPE_AAAA) {
        return None;
    }
    Some((id, flags, an, at + 4, name))
}

/// A standard query (QR 0, opcode 0) for the A or AAAA records of one name.
pub fn parse_query(msg: &[u8]) -> Option<Query> {
    let (id, flags, _, _, name) = header_and_question(msg)?;
    (flags & 0xF800 == 0).then_some(Query { id, name })
}

/// A response (QR 1, opcode 0, no error) with its addresses for the question's name.
pub fn parse_answer(msg: &[u8]) -> Option<Answer> {
    let (id, flags, an, mut at, name) = header_and_question(msg)?;
    if flags & 0xF800 != 0x8000 || flags & 0x000F != 0 {
        return None;
    }
    // (owner, type, ttl, data offset, data length)
    let mut records = Vec::new();
    for _ in 0..usize::from(an).min(MAX_RECORDS) {
        let (owner, next) = read_name(msg, at)?;
        let (rtype, class) = (be16(msg, next)?, be16(msg, next + 2)?);
        let ttl = be32(msg, next + 4)?;
        let len = usize::from(be16(msg, next + 8)?);
        let data = next + 10;
        msg.get(data..data + len)?;
        if class == CLASS_IN {
            records.push((owner, rtype, ttl, data, len));
        }
        at = data + len;
    }
    let mut chain = vec![name.clone()];
    for _ in 0..MAX_CHAIN {
        let Some(tail) = chain.last().cloned() else {
            break;
        };
        let Some(target) = records
            .iter()
            .filter(|r| r.1 == TYPE_CNAME && r.0 == tail)
            .find_map(|r| read_name(msg, r.3).map(|(n, _)| n))
        else {
            break;
        };
        if chain.contains(&target) {
            break;
        }
        chain.push(target);
    }
    let addrs = records
        .iter()
        .filter(|r| chain.contains(&r.0))
        .filter_map(|&(_, rtype, ttl, data, len)| {
            let d = msg.get(data..data + len)?;
            let ip = match (rtype, len) {
                (TYPE_A, 4) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(d).ok()?)),
                (TYPE_AAAA, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(d).ok()?)),
                _ => return None,
            };
            Some((ip, ttl))
        })
        .collect();
    Some(Answer { id, name, addrs })
}

/// The name at `at` (lower case, without the root's dot) and the offset after it where it
/// sits (after the first pointer, if it jumps). None for a malformed or too long name, a
/// pointer loop, or a label with bytes other than a-z, 0-9, `-`, `_`.
fn read_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut after = None;
    let mut jumps = 0;
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => break,
            1..=63 => {
                let label = msg.get(at + 1..at + 1 + usize::from(len))?;
                if !name.is_empty() {
                    name.push('.');
                }
                for &b in label {
                    let b = b.to_ascii_lowercase();
                    if !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
                        return None;
                    }
                    name.push(char::from(b));
                }
                if name.len() > MAX_NAME {
                    return None;
                }
                at += 1 + usize::from(len);
            }
            0xC0..=0xFF => {
                jumps += 1;
                if jumps > MAX_JUMPS {
                    return None;
                }
                let target = usize::from(be16(msg, at)? & 0x3FFF);
                after.get_or_insert(at + 2);
                at = target;
            }
            _ => return None,
        }
    }
    if name.is_empty() {
        return None;
    }
    Some((name, after.unwrap_or(at + 1)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A name in wire format.
    pub(crate) fn wire(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for l in name.split('.') {
            out.push(u8::try_from(l.len()).unwrap());
            out.extend_from_slice(l.as_bytes());
        }
        out.push(0);
        out
    }

    /// A query for the A records of `name`.
    pub(crate) fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&wire(name));
        m.extend_from_slice(&[0, 1, 0, 1]);
        m
    }

    /// The answer to [`query`]: a CNAME to `via` if given, then A records for it (or for the
    /// name, compressed as a pointer to the question).
    pub(crate) fn answer(
        id: u16,
        name: &str,
        via: Option<&str>,
        addrs: &[[u8; 4]],
        ttl: u32,
    ) -> Vec<u8> {
        let mut m = query(id, name);
        m[2] = 0x81;
        m[3] = 0x80;
        let an = u16::try_from(addrs.len() + usize::from(via.is_some())).unwrap();
        m[6..8].copy_from_slice(&an.to_be_bytes());
        let owner_at = if let Some(via) = via {
            m.extend_from_slice(&[0xC0, 12, 0, 5, 0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            let w = wire(via);
            m.extend_from_slice(&u16::try_from(w.len()).unwrap().to_be_bytes());
            let at = m.len();
            m.extend_from_slice(&w);
            at
        } else {
            12
        };
        for a in addrs {
            m.extend_from_slice(&[0xC0, u8::try_from(owner_at).unwrap(), 0, 1, 0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&[0, 4]);
            m.extend_from_slice(a);
        }
        m
    }

    #[test]
    fn patterns_match_the_name_or_the_names_below() {
        let star = NamePattern::parse("*.Corp.Example.").unwrap();
        assert!(star.matches("a.corp.example") && star.matches("x.y.corp.example"));
        assert!(!star.matches("corp.example") && !star.matches("evilcorp.example"));
        let one = NamePattern::parse("intranet.corp.example").unwrap();
        assert!(one.matches("intranet.corp.example") && !one.matches("x.intranet.corp.example"));
        assert_eq!(star.to_string(), "*.corp.example");
        for bad in ["", "*", "a..b", "a.*.b", "a b", "x.\u{e9}", &"a".repeat(64)] {
            assert!(NamePattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn answers_give_the_addresses_of_the_question_through_cnames() {
        assert_eq!(
            parse_query(&query(7, "WWW.corp.example")),
            Some(Query {
                id: 7,
                name: "www.corp.example".into()
            })
        );
        assert_eq!(
            parse_answer(&query(7, "a.b")),
            None,
            "a query is not an answer"
        );
        let a = parse_answer(&answer(
            7,
            "www.corp.example",
            None,
            &[[10, 9, 0, 1], [10, 9, 0, 2]],
            300,
        ))
        .unwrap();
        assert_eq!(a.name, "www.corp.example");
        assert_eq!(
            a.addrs,
            vec![
                (IpAddr::from([10, 9, 0, 1]), 300),
                (IpAddr::from([10, 9, 0, 2]), 300)
            ]
        );
        let c = parse_answer(&answer(
            8,
            "www.corp.example",
            Some("edge.cdn.example"),
            &[[192, 0, 2, 5]],
            60,
        ))
        .unwrap();
        assert_eq!(c.addrs, vec![(IpAddr::from([192, 0, 2, 5]), 60)]);
    }

    #[test]
    fn malformed_messages_are_ignored() {
        let good = answer(9, "www.corp.example", None, &[[10, 9, 0, 1]], 300);
        // Every truncation parses to nothing or to fewer records, never panics.
        for n in 0..good.len() {
            if let Some(a) = parse_answer(&good[..n]) {
                panic!("a truncated answer parsed: {a:?}");
            }
        }
        // A pointer to itself.
        let mut looped = good.clone();
        looped[12] = 0xC0;
        looped[13] = 12;
        assert_eq!(parse_answer(&looped), None);
        // An error answer (NXDOMAIN) gives nothing.
        let mut err = good.clone();
        err[3] = 0x83;
        assert_eq!(parse_answer(&err), None);
        // A record for another name is not the question's.
        let other = answer(9, "www.corp.example", None, &[[10, 9, 0, 1]], 300);
        let mut forged = other.clone();
        let at = forged.len() - 16;
        forged[at] = 0xC0;
        forged[at + 1] = 16; // points into the middle of the question: "corp.example"
        assert_eq!(parse_answer(&forged).unwrap().addrs, vec![]);
        // Random bytes never panic.
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut m = good.clone();
            for _ in 0..4 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let i = (x as usize >> 8) % m.len();
                m[i] = x.to_be_bytes()[1];
            }
            let _ = parse_answer(&m);
            let _ = parse_query(&m);
        }
    }
}
