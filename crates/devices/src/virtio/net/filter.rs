//! The network policy enforced on every frame of a virtio-net device, in the VMM (a guest,
//! rooted or not, cannot change it).
//!
//! A [`Filter`] has a default verdict and ordered rules; the first rule that matches a
//! connection decides. A rule matches the **remote** address (a CIDR block), the protocol and
//! the **service port** of a connection: for one the guest opens, the destination; for one a
//! peer opens to the guest, the guest's port it connects to. Stateful: once a connection is
//! allowed, frames of the same flow both ways pass without a new decision (replies need no
//! rule); flows are forgotten after [`FLOW_IDLE`] without a frame, and at most [`MAX_FLOWS`]
//! are kept (the least recently seen goes first).
//!
//! Always let through, whatever the rules: ARP, and ICMPv6 neighbour discovery (router and
//! neighbour solicitations and advertisements, redirects), without which no address resolves.
//! IPv4 fragments after the first carry no ports: only rules without ports decide them, else
//! the default. Frames of other ethertypes (and IP frames too short to read) follow the
//! default. A refused frame is dropped and counted ([`FilterStats`]), and tallied under the
//! rule that refused it (or the default) until the host takes the tallies
//! ([`Filter::take_drops`]) to write them to its audit log: counts per rule per interval,
//! never a record per frame.
//!
//! **Rules by DNS name** ([`NamePattern`]: `intranet.corp.example`, `*.corp.example`) match
//! the addresses the guest learnt for such a name from a resolver the policy trusts
//! ([`Filter::with_dns`]): the filter reads the guest's UDP queries to a trusted resolver's
//! port 53 for names a rule covers, and the answers that come back for them (same resolver,
//! port, transaction id and name), and admits the A and AAAA addresses of the answer
//! (through its CNAMEs) for their TTL ([`MIN_TTL`] to [`MAX_TTL`]). An answer nobody asked
//! for, from another server, or for another name teaches nothing. The rule lets through
//! what it matches only while the address is known; a flow it allowed then lives as any
//! flow does.

pub(crate) mod dns;

pub use dns::NamePattern;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Flows remembered at most.
pub const MAX_FLOWS: usize = 16_384;
/// A flow without a frame for this long is forgotten.
pub const FLOW_IDLE: Duration = Duration::from_secs(300);
/// Refused frames are logged at most once per this long (with the counts since).
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Queries to a trusted resolver waited for at most (the oldest beyond are not learnt from).
pub const MAX_PENDING_QUERIES: usize = 256;
/// How long an answer may take to count.
pub const QUERY_WAIT: Duration = Duration::from_secs(10);
/// Addresses learnt from answers, at most (the one known for the least time left goes).
pub const MAX_LEARNT: usize = 4096;
/// Names remembered per learnt address.
const NAMES_PER_ADDR: usize = 4;
/// Shortest time an answer's address is admitted (a TTL of 0 still lets the guest connect).
pub const MIN_TTL: Duration = Duration::from_secs(30);
/// Longest time an answer's address is admitted.
pub const MAX_TTL: Duration = Duration::from_secs(86_400);
/// Tallies of replaced policies kept until taken, at most (more are merged into one).
pub const MAX_CARRIED_TALLIES: usize = 64;
/// Most IPv6 extension headers walked before giving up (the frame follows the default).
const MAX_EXT_HEADERS: usize = 8;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;

/// Let through or drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Drop it.
    Deny,
}

/// The protocol a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Any protocol.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP and ICMPv6.
    Icmp,
}

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length (0-32 for IPv4, 0-128 for IPv6).
    pub prefix: u8,
}

impl IpNet {
    /// Parses `ADDR/PREFIX` (or a bare address: one host).
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0-{max}"))?,
        };
        Ok(IpNet { addr, prefix })
    }

    /// Whether `ip` is inside the block (an IPv4 block never holds an IPv6 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What a match does.
    pub verdict: Verdict,
    /// The remote address block; none: any.
    pub net: Option<IpNet>,
    /// The remote's DNS name: the remote must be an address an answer gave for a name it
    /// covers, still within its TTL; none: any.
    pub name: Option<NamePattern>,
    /// The protocol.
    pub proto: Proto,
    /// The service ports (TCP and UDP); none: any.
    pub ports: Option<(u16, u16)>,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        })
    }
}

/// `deny tcp 10.0.0.0/8 port 443`, `allow any`: the rule as the audit log shows it.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        };
        write!(f, "{} {proto}", self.verdict)?;
        if let Some(n) = self.net {
            write!(f, " {}/{}", n.addr, n.prefix)?;
        }
        if let Some(n) = &self.name {
            write!(f, " name {n}")?;
        }
        match self.ports {
            Some((a, b)) if a == b => write!(f, " port {a}"),
            Some((a, b)) => write!(f, " ports {a}-{b}"),
            None => Ok(()),
        }
    }
}

impl Rule {
    fn matches(&self, c: &Conn) -> bool {
        self.net.is_none_or(|n| n.contains(c.remote))
            && match self.proto {
                Proto::Any => true,
                Proto::Tcp => c.proto == PROTO_TCP,
                Proto::Udp => c.proto == PROTO_UDP,
                Proto::Icmp => c.proto == PROTO_ICMP || c.proto == PROTO_ICMPV6,
            }
            && match (self.ports, c.service_port) {
                (None, _) => true,
                (Some((first, last)), Some(p)) => (first..=last).contains(&p),
                (Some(_), None) => false,
            }
    }
}

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the guest to the network (tx).
    Out,
    /// From the network to the guest (rx).
    In,
}

/// Frames let through and dropped, per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterStats {
    /// Frames from the guest let through.
    pub out_allowed: u64,
    /// Frames from the guest dropped.
    pub out_dropped: u64,
    /// Frames to the guest let through.
    pub in_allowed: u64,
    /// Frames to the guest dropped.
    pub in_dropped: u64,
}

/// Frames one rule (or the default) refused since the tallies were last taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropTally {
    /// Which rule: `rule 2 (deny udp ports 5000-6000)` or `default (deny)`; a rule of a
    /// policy replaced since ends with `, replaced`.
    pub rule: String,
    /// Frames from the guest it refused.
    pub out: u64,
    /// Frames to the guest it refused.
    pub inn: u64,
    /// The last of them, described (`out tcp 10.0.0.2:40000 -> 10.1.2.3:80`).
    pub last: String,
}

/// One flow, as seen from the guest: (protocol, guest address, guest port or ICMP id,
/// remote address, remote port or ICMP id).
type FlowKey = (u8, IpAddr, u16, IpAddr, u16);

/// What a frame is, for the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Conn {
    proto: u8,
    local: IpAddr,
    remote: IpAddr,
    local_port: Option<u16>,
    remote_port: Option<u16>,
    /// The port the connection is made to (the destination of its first frame).
    service_port: Option<u16>,
}

/// What the filter makes of one frame.
#[derive(Debug, Clone, Copy)]
enum Parsed {
    /// Always let through (ARP, NDP).
    Infrastructure,
    /// A frame the rules decide.
    Conn(Conn),
    /// Not readable or not IP: the default decides.
    Other,
}

/// A compiled network policy with its flow table.
#[derive(Debug)]
pub struct Filter {
    default: Verdict,
    rules: Vec<Rule>,
    flows: HashMap<FlowKey, Instant>,
    stats: FilterStats,
    /// The last refused frame, described.
    last_dropped: Option<String>,
    /// The counts at the last report, and when it was made.
    reported: (FilterStats, Option<Instant>),
    /// Refusals not yet taken, by rule index; the last slot is the default's.
    tallies: Vec<Option<DropTally>>,
    /// Tallies of the policies this one replaced, not yet taken.
    carried: Vec<DropTally>,
    /// The resolvers whose answers teach names.
    dns_servers: Vec<IpAddr>,
    /// Queries sent to them for names a rule covers: (server, guest port, id) -> (name, sent).
    pending: HashMap<(IpAddr, u16, u16), (String, Instant)>,
    /// Addresses learnt from answers: the names they were given for, each until when.
    learnt: HashMap<IpAddr, Vec<(String, Instant)>>,
}

impl Filter {
    /// A filter with `default` for what no rule matches, and `rules` in order.
    pub fn new(default: Verdict, rules: Vec<Rule>) -> Self {
        let slots = rules.len() + 1;
        Self {
            default,
            rules,
            flows: HashMap::new(),
            stats: FilterStats::default(),
            last_dropped: None,
            reported: (FilterStats::default(), None),
            tallies: vec![None; slots],
            carried: Vec::new(),
            dns_servers: Vec::new(),
            pending: HashMap::new(),
            learnt: HashMap::new(),
        }
    }

    /// This filter trusting the answers of `servers` (port 53) for its name rules.
    pub fn with_dns(mut self, servers: Vec<IpAddr>) -> Self {
        self.dns_servers = servers;
        self
    }

    /// Addresses learnt from answers now.
    pub fn learnt_count(&self) -> usize {
        self.learnt.len()
    }

    /// The frames refused since the last call, per rule (those that refused none are left
    /// out), rules of replaced policies first; the tallies start again from zero.
    pub fn take_drops(&mut self) -> Vec<DropTally> {
        let mut out = std::mem::take(&mut self.carried);
        out.extend(self.tallies.iter_mut().filter_map(Option::take));
        out
    }

    /// [`Self::take_drops`] for a filter that is being replaced or removed: its own rules'
    /// labels get `mark` (those of policies it replaced have theirs already).
    pub fn take_drops_of_retired(&mut self, mark: &str) -> Vec<DropTally> {
        let mut out = std::mem::take(&mut self.carried);
        for mut t in self.tallies.iter_mut().filter_map(Option::take) {
            t.rule.push_str(mark);
            out.push(t);
        }
        out
    }

    /// The label of rule `index` (`None`: the default) in the audit log.
    fn label(&self, index: Option<usize>) -> String {
        match index.and_then(|i| Some((i, self.rules.get(i)?))) {
            Some((i, r)) => format!("rule {} ({r})", i + 1),
            None => format!("default ({})", self.default),
        }
    }

    fn tally(&mut self, index: Option<usize>, dir: Direction, last: &str) {
        let slot = index.unwrap_or(self.rules.len());
        let label = match self.tallies.get(slot) {
            Some(Some(_)) => String::new(),
            _ => self.label(index),
        };
        let Some(entry) = self.tallies.get_mut(slot) else {
            return;
        };
        let t = entry.get_or_insert_with(|| DropTally {
            rule: label,
            out: 0,
            inn: 0,
            last: String::new(),
        });
        match dir {
            Direction::Out => t.out = t.out.saturating_add(1),
            Direction::In => t.inn = t.inn.saturating_add(1),
        }
        last.clone_into(&mut t.last);
    }

    /// A one-line summary of the frames refused since the last one, if there were any and
    /// the last was at least [`REPORT_EVERY`] ago (so a guest cannot flood the log).
    pub fn report_due(&mut self, now: Instant) -> Option<String> {
        let (before, at) = self.reported;
        let out = self.stats.out_dropped - before.out_dropped;
        let inn = self.stats.in_dropped - before.in_dropped;
        if out + inn == 0 || at.is_some_and(|t| now.saturating_duration_since(t) < REPORT_EVERY) {
            return None;
        }
        self.reported = (self.stats, Some(now));
        Some(format!(
            "network policy dropped {out} frames from the guest and {inn} to it (totals {} and \
             {}); last: {}",
            self.stats.out_dropped,
            self.stats.in_dropped,
            self.last_dropped.as_deref().unwrap_or("?")
        ))
    }

    /// Counts so far.
    pub fn stats(&self) -> FilterStats {
        self.stats
    }

    /// The last refused frame, described (`out tcp 10.0.0.2:40000 -> 10.1.2.3:80`).
    pub fn last_dropped(&self) -> Option<&str> {
        self.last_dropped.as_deref()
    }

    /// This filter (its rules, no flows) with the counts and report state of `old`, which it
    /// replaces: the totals go on across a policy change.
    /// The refusals `old` tallied and nobody took yet are kept (their rules marked
    /// replaced; at most [`MAX_CARRIED_TALLIES`], the rest merged into one).
    pub fn with_counts_of(mut self, old: &mut Filter) -> Filter {
        self.stats = old.stats;
        self.last_dropped.clone_from(&old.last_dropped);
        self.reported = old.reported;
        // What answers said stays true for its TTL; the queries in flight are still awaited.
        self.learnt = std::mem::take(&mut old.learnt);
        self.pending = std::mem::take(&mut old.pending);
        let mut carried = old.take_drops_of_retired(", replaced");
        if carried.len() > MAX_CARRIED_TALLIES {
            let rest = carried.split_off(MAX_CARRIED_TALLIES - 1);
            let merged = rest.into_iter().fold(
                DropTally {
                    rule: "rules of earlier policies".into(),
                    out: 0,
                    inn: 0,
                    last: String::new(),
                },
                |mut m, t| {
                    m.out = m.out.saturating_add(t.out);
                    m.inn = m.inn.saturating_add(t.inn);
                    m.last = t.last;
                    m
                },
            );
            carried.push(merged);
        }
        self.carried = carried;
        self
    }

    /// Decides one Ethernet frame (without the vnet header) travelling `dir` at `now`.
    pub fn check(&mut self, frame: &[u8], dir: Direction, now: Instant) -> Verdict {
        let parsed = parse(frame, dir);
        let (verdict, rule) = match parsed {
            Parsed::Infrastructure => (Verdict::Allow, None),
            Parsed::Other => (self.default, None),
            Parsed::Conn(c) => self.decide(c, now),
        };
        if let (Verdict::Allow, Parsed::Conn(c)) = (verdict, parsed) {
            if c.proto == PROTO_UDP
                && c.remote_port == Some(53)
                && self.dns_servers.contains(&c.remote)
            {
                self.snoop_dns(c, dir, frame, now);
            }
        }
        if verdict == Verdict::Deny {
            let what = describe(&parsed, dir, frame);
            self.tally(rule, dir, &what);
            self.last_dropped = Some(what);
        }
        let counter = match (dir, verdict) {
            (Direction::Out, Verdict::Allow) => &mut self.stats.out_allowed,
            (Direction::Out, Verdict::Deny) => &mut self.stats.out_dropped,
            (Direction::In, Verdict::Allow) => &mut self.stats.in_allowed,
            (Direction::In, Verdict::Deny) => &mut self.stats.in_dropped,
        };
        *counter = counter.saturating_add(1);
        verdict
    }

    /// The verdict on `c`, and the rule that gave it (none: a known flow or the default).
    fn decide(&mut self, c: Conn, now: Instant) -> (Verdict, Option<usize>) {
        let key = c.local_port.zip(c.remote_port).map(|(lp, rp)| {
            // ICMP echo: the identifier stands for both ports.
            (c.proto, c.local, lp, c.remote, rp)
        });
        if let Some(key) = key {
            if let Some(seen) = self.flows.get_mut(&key) {
                if now.saturating_duration_since(*seen) < FLOW_IDLE {
                    *seen = now;
                    return (Verdict::Allow, None);
                }
            }
        }
        let learnt = &self.learnt;
        let hit = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| {
                r.matches(&c)
                    && r.name
                        .as_ref()
                        .is_none_or(|p| known_as(learnt, c.remote, p, now))
            })
            .map(|(i, r)| (i, r.verdict));
        let (verdict, rule) = hit.map_or((self.default, None), |(i, v)| (v, Some(i)));
        if verdict == Verdict::Allow {
            if let Some(key) = key {
                self.remember(key, now);
            }
        }
        (verdict, rule)
    }

    /// Reads a DNS message the guest sent to (or got from) trusted resolver `c.remote`,
    /// both already let through: a query for a name a rule covers is remembered; the answer
    /// to a remembered query teaches its addresses.
    fn snoop_dns(&mut self, c: Conn, dir: Direction, frame: &[u8], now: Instant) {
        let (Some(msg), Some(port)) = (udp_payload(frame), c.local_port) else {
            return;
        };
        match dir {
            Direction::Out => {
                let Some(q) = dns::parse_query(msg) else {
                    return;
                };
                let covered = self
                    .rules
                    .iter()
                    .any(|r| r.name.as_ref().is_some_and(|p| p.matches(&q.name)));
                if !covered {
                    return;
                }
                if self.pending.len() >= MAX_PENDING_QUERIES {
                    self.pending
                        .retain(|_, (_, sent)| now.saturating_duration_since(*sent) < QUERY_WAIT);
                    if self.pending.len() >= MAX_PENDING_QUERIES {
                        return;
                    }
                }
                self.pending.insert((c.remote, port, q.id), (q.name, now));
            }
            Direction::In => {
                let Some(a) = dns::parse_answer(msg) else {
                    return;
                };
                let key = (c.remote, port, a.id);
                let asked = self.pending.get(&key).is_some_and(|(name, sent)| {
                    *name == a.name && now.saturating_duration_since(*sent) < QUERY_WAIT
                });
                if !asked {
                    return;
                }
                self.pending.remove(&key);
                for (ip, ttl) in a.addrs {
                    let ttl = Duration::from_secs(u64::from(ttl)).clamp(MIN_TTL, MAX_TTL);
                    self.learn(ip, &a.name, now, now + ttl);
                }
            }
        }
    }

    /// Remembers at `now` that `ip` is `name` until `until` (bounded, see [`MAX_LEARNT`]).
    fn learn(&mut self, ip: IpAddr, name: &str, now: Instant, until: Instant) {
        if self.learnt.len() >= MAX_LEARNT && !self.learnt.contains_key(&ip) {
            self.learnt.retain(|_, names| {
                names.retain(|(_, u)| *u > now);
                !names.is_empty()
            });
            if self.learnt.len() >= MAX_LEARNT {
                let last = |names: &Vec<(String, Instant)>| names.iter().map(|(_, u)| *u).max();
                if let Some(soonest) = self
                    .learnt
                    .iter()
                    .min_by_key(|(_, names)| last(names))
                    .map(|(ip, _)| *ip)
                {
                    self.learnt.remove(&soonest);
                }
            }
        }
        let names = self.learnt.entry(ip).or_default();
        if let Some(known) = names.iter_mut().find(|(n, _)| n == name) {
            known.1 = known.1.max(until);
        } else if names.len() < NAMES_PER_ADDR {
            names.push((name.to_string(), until));
        } else if let Some(soonest) = names.iter_mut().min_by_key(|(_, u)| *u) {
            *soonest = (name.to_string(), until);
        }
    }

    fn remember(&mut self, key: FlowKey, now: Instant) {
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&key) {
            self.flows
                .retain(|_, seen| now.saturating_duration_since(*seen) < FLOW_IDLE);
            if self.flows.len() >= MAX_FLOWS {
                if let Some(oldest) = self.flows.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                    self.flows.remove(&oldest);
                }
            }
        }
        self.flows.insert(key, now);
    }

    /// Flows remembered now.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }
}

/// Whether `ip` was given (and is still within its TTL) for a name `pattern` covers.
fn known_as(
    learnt: &HashMap<IpAddr, Vec<(String, Instant)>>,
    ip: IpAddr,
    pattern: &NamePattern,
    now: Instant,
) -> bool {
    learnt
        .get(&ip)
        .is_some_and(|names| names.iter().any(|(n, u)| *u > now && pattern.matches(n)))
}

/// The UDP payload of an IPv4 or IPv6 frame (first fragment), if it holds one.
fn udp_payload(frame: &[u8]) -> Option<&[u8]> {
    let l3 = frame.get(ETH_HLEN..)?;
    let ip = match be16(frame, 12)? {
        ETHERTYPE_IPV4 => parse_ipv4(l3)?,
        ETHERTYPE_IPV6 => parse_ipv6(l3)?,
        _ => return None,
    };
    if ip.proto != PROTO_UDP || !ip.first_fragment {
        return None;
    }
    ip.l4.get(8..)
}

/// `out tcp 10.0.0.2:40000 -> 10.1.2.3:80`, for the log.
fn describe(p: &Parsed, dir: Direction, frame: &[u8]) -> String {
    let way = match dir {
        Direction::Out => "out",
        Direction::In => "in",
    };
    let Parsed::Conn(c) = p else {
        let ethertype = be16(frame, 12).unwrap_or(0);
        return format!("{way} ethertype {ethertype:#06x}, {} bytes", frame.len());
    };
    let proto = match c.proto {
        PROTO_TCP => "tcp".to_string(),
        PROTO_UDP => "udp".to_string(),
        PROTO_ICMP => "icmp".to_string(),
        PROTO_ICMPV6 => "icmpv6".to_string(),
        n => format!("protocol {n}"),
    };
    let end = |ip: IpAddr, port: Option<u16>| match port {
        Some(p) if matches!(c.proto, PROTO_TCP | PROTO_UDP) => match ip {
            IpAddr::V4(_) => format!("{ip}:{p}"),
            IpAddr::V6(_) => format!("[{ip}]:{p}"),
        },
        _ => ip.to_string(),
    };
    let (from, to) = match dir {
        Direction::Out => (end(c.local, c.local_port), end(c.remote, c.remote_port)),
        Direction::In => (end(c.remote, c.remote_port), end(c.local, c.local_port)),
    };
    format!("{way} {proto} {from} -> {to}")
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn parse(frame: &[u8], dir: Direction) -> Parsed {
    let Some(ethertype) = be16(frame, 12) else {
        return Parsed::Other;
    };
    let Some(l3) = frame.get(ETH_HLEN..) else {
        return Parsed::Other;
    };
    let ip = match ethertype {
        ETHERTYPE_ARP => return Parsed::Infrastructure,
        ETHERTYPE_IPV4 => parse_ipv4(l3),
        ETHERTYPE_IPV6 => parse_ipv6(l3),
        _ => None,
    };
    let Some(ip) = ip else {
        return Parsed::Other;
    };
    if ip.proto == PROTO_ICMPV6 && ip.l4.first().is_some_and(|t| (133..=137).contains(t)) {
        return Parsed::Infrastructure;
    }
    let (src_port, dst_port) = if ip.first_fragment {
        ports(ip.proto, ip.l4)
    } else {
        (None, None)
    };
    let (local, remote, local_port, remote_port) = match dir {
        Direction::Out => (ip.src, ip.dst, src_port, dst_port),
        Direction::In => (ip.dst, ip.src, dst_port, src_port),
    };
    Parsed::Conn(Conn {
        proto: ip.proto,
        local,
        remote,
        local_port,
        remote_port,
        service_port: if matches!(ip.proto, PROTO_TCP | PROTO_UDP) {
            dst_port
        } else {
            None
        },
    })
}

/// The transport ports of a TCP or UDP header, or an ICMP echo's identifier as both.
fn ports(proto: u8, l4: &[u8]) -> (Option<u16>, Option<u16>) {
    match proto {
        PROTO_TCP | PROTO_UDP => (be16(l4, 0), be16(l4, 2)),
        // Echo request/reply (ICMP 8/0, ICMPv6 128/129): the identifier pairs them.
        PROTO_ICMP if matches!(l4.first(), Some(0 | 8)) => {
            let id = be16(l4, 4);
            (id, id)
        }
        PROTO_ICMPV6 if matches!(l4.first(), Some(128 | 129)) => {
            let id = be16(l4, 4);
            (id, id)
        }
        _ => (None, None),
    }
}

struct IpPacket<'a> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    first_fragment: bool,
    l4: &'a [u8],
}

fn parse_ipv4(p: &[u8]) -> Option<IpPacket<'_>> {
    let vihl = *p.first()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0F) * 4;
    if ihl < 20 {
        return None;
    }
    let frag = be16(p, 6)? & 0x1FFF;
    let src: [u8; 4] = p.get(12..16)?.try_into().ok()?;
    let dst: [u8; 4] = p.get(16..20)?.try_into().ok()?;
    Some(IpPacket {
        src: IpAddr::V4(Ipv4Addr::from(src)),
        dst: IpAddr::V4(Ipv4Addr::from(dst)),
        proto: *p.get(9)?,
        first_fragment: frag == 0,
        l4: p.get(ihl..)?,
    })
}

fn parse_ipv6(p: &[u8]) -> Option<IpPacket<'_>> {
    if *p.first()? >> 4 != 6 {
        return None;
    }
    let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
    let mut next = *p.get(6)?;
    let mut at = 40;
    let mut first_fragment = true;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units after 8.
            0 | 43 | 60 => {
                let len = (usize::from(*p.get(at + 1)?) + 1) * 8;
                next = *p.get(at)?;
                at += len;
            }
            // Fragment: 8 bytes; the offset is the top 13 bits of bytes 2-3.
            44 => {
                first_fragment = be16(p, at + 2)? >> 3 == 0;
                next = *p.get(at)?;
                at += 8;
            }
            _ => {
                return Some(IpPacket {
                    src: IpAddr::V6(Ipv6Addr::from(src)),
                    dst: IpAddr::V6(Ipv6Addr::from(dst)),
                    proto: next,
                    first_fragment,
                    l4: p.get(at..)?,
                })
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
