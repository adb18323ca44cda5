use super::*;

const GUEST4: [u8; 4] = [10, 0, 0, 2];
const GUEST6: &str = "fd00::2";

/// An Ethernet frame of `ethertype` around `l3`.
pub(crate) fn eth(ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 7]);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// An IPv4 frame of `proto` from `src` to `dst`, with `l4` (ports first for TCP/UDP).
pub(crate) fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0];
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    eth(ETHERTYPE_IPV4, &p)
}

fn ipv6(src: &str, dst: &str, next: u8, rest: &[u8]) -> Vec<u8> {
    let src: Ipv6Addr = src.parse().unwrap();
    let dst: Ipv6Addr = dst.parse().unwrap();
    let mut p = vec![0x60, 0, 0, 0, 0, 0, next, 64];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(rest);
    eth(ETHERTYPE_IPV6, &p)
}

fn ports(src: u16, dst: u16) -> Vec<u8> {
    let mut l4 = src.to_be_bytes().to_vec();
    l4.extend_from_slice(&dst.to_be_bytes());
    l4.extend_from_slice(&[0; 16]);
    l4
}

fn rule(verdict: Verdict, net: Option<&str>, proto: Proto, ports: Option<(u16, u16)>) -> Rule {
    Rule {
        verdict,
        net: net.map(|n| IpNet::parse(n).unwrap()),
        name: None,
        proto,
        ports,
    }
}

/// deny by default; TCP 443 and UDP 5000-5010 to 10.1.0.0/16 and anything to fd00:1::/64.
fn office() -> Filter {
    Filter::new(
        Verdict::Deny,
        vec![
            rule(Verdict::Deny, Some("10.1.9.9/32"), Proto::Any, None),
            rule(
                Verdict::Allow,
                Some("10.1.0.0/16"),
                Proto::Tcp,
                Some((443, 443)),
            ),
            rule(
                Verdict::Allow,
                Some("10.1.0.0/16"),
                Proto::Udp,
                Some((5000, 5010)),
            ),
            rule(Verdict::Allow, Some("fd00:1::/64"), Proto::Any, None),
        ],
    )
}

#[test]
fn rules_decide_by_address_protocol_and_port_first_match_wins() {
    let mut f = office();
    let now = Instant::now();
    let out = |f: &mut Filter, dst: [u8; 4], proto: u8, port: u16| {
        f.check(
            &ipv4(GUEST4, dst, proto, 0, &ports(40000, port)),
            Direction::Out,
            now,
        )
    };
    assert_eq!(out(&mut f, [10, 1, 2, 3], PROTO_TCP, 443), Verdict::Allow);
    assert_eq!(out(&mut f, [10, 1, 2, 3], PROTO_TCP, 80), Verdict::Deny);
    assert_eq!(out(&mut f, [10, 1, 2, 3], PROTO_UDP, 443), Verdict::Deny);
    assert_eq!(out(&mut f, [10, 1, 2, 3], PROTO_UDP, 5010), Verdict::Allow);
    assert_eq!(out(&mut f, [10, 1, 2, 3], PROTO_UDP, 5011), Verdict::Deny);
    assert_eq!(out(&mut f, [10, 2, 0, 1], PROTO_TCP, 443), Verdict::Deny);
    // The first rule denies this host before the /16 allows it.
    assert_eq!(out(&mut f, [10, 1, 9, 9], PROTO_TCP, 443), Verdict::Deny);
    let s = f.stats();
    assert_eq!((s.out_allowed, s.out_dropped), (2, 5));

    let v6 = |f: &mut Filter, dst: &str| {
        f.check(
            &ipv6(GUEST6, dst, PROTO_UDP, &ports(1, 53)),
            Direction::Out,
            now,
        )
    };
    assert_eq!(v6(&mut f, "fd00:1::53"), Verdict::Allow);
    assert_eq!(v6(&mut f, "fd00:2::53"), Verdict::Deny);

    let mut open = Filter::new(
        Verdict::Allow,
        vec![rule(Verdict::Deny, None, Proto::Udp, Some((53, 53)))],
    );
    assert_eq!(out(&mut open, [8, 8, 8, 8], PROTO_UDP, 53), Verdict::Deny);
    assert_eq!(out(&mut open, [8, 8, 8, 8], PROTO_TCP, 53), Verdict::Allow);
    assert_eq!(out(&mut open, [8, 8, 8, 8], PROTO_ICMP, 0), Verdict::Allow);
}

#[test]
fn replies_to_allowed_connections_pass_and_unsolicited_frames_do_not() {
    let mut f = office();
    let t0 = Instant::now();
    let server = [10, 1, 2, 3];
    let request = ipv4(GUEST4, server, PROTO_TCP, 0, &ports(40000, 443));
    let reply = ipv4(server, GUEST4, PROTO_TCP, 0, &ports(443, 40000));
    // Before the guest opened it, the "reply" is a connection from 10.1.2.3:443 to the
    // guest's port 40000: no rule allows that.
    assert_eq!(f.check(&reply, Direction::In, t0), Verdict::Deny);
    assert_eq!(f.check(&request, Direction::Out, t0), Verdict::Allow);
    assert_eq!(f.check(&reply, Direction::In, t0), Verdict::Allow);
    assert_eq!(f.flow_count(), 1);
    // Another port of the same server is not part of the flow.
    let other = ipv4(server, GUEST4, PROTO_TCP, 0, &ports(443, 40001));
    assert_eq!(f.check(&other, Direction::In, t0), Verdict::Deny);
    // Idle too long: forgotten.
    let later = t0 + FLOW_IDLE + Duration::from_secs(1);
    assert_eq!(f.check(&reply, Direction::In, later), Verdict::Deny);

    // An ICMPv6 echo to an allowed block; its reply comes back.
    let echo = ipv6(
        GUEST6,
        "fd00:1::1",
        PROTO_ICMPV6,
        &[128, 0, 0, 0, 0x12, 0x34, 0, 1],
    );
    let echo_reply = ipv6(
        "fd00:1::1",
        GUEST6,
        PROTO_ICMPV6,
        &[129, 0, 0, 0, 0x12, 0x34, 0, 1],
    );
    let mut closed = Filter::new(
        Verdict::Deny,
        vec![rule(Verdict::Allow, Some("fd00:1::1"), Proto::Icmp, None)],
    );
    assert_eq!(closed.check(&echo, Direction::Out, t0), Verdict::Allow);
    assert_eq!(closed.check(&echo_reply, Direction::In, t0), Verdict::Allow);
    let stray = ipv6(
        "fd00:9::1",
        GUEST6,
        PROTO_ICMPV6,
        &[129, 0, 0, 0, 0x12, 0x34, 0, 1],
    );
    assert_eq!(closed.check(&stray, Direction::In, t0), Verdict::Deny);
}

#[test]
fn arp_and_neighbour_discovery_always_pass_other_ethertypes_follow_the_default() {
    let mut f = Filter::new(Verdict::Deny, vec![]);
    let now = Instant::now();
    assert_eq!(
        f.check(&eth(ETHERTYPE_ARP, &[0; 28]), Direction::Out, now),
        Verdict::Allow
    );
    assert_eq!(
        f.check(&eth(ETHERTYPE_ARP, &[0; 28]), Direction::In, now),
        Verdict::Allow
    );
    for ndp in 133..=137u8 {
        let ns = ipv6(GUEST6, "ff02::1:ff00:1", PROTO_ICMPV6, &[ndp, 0, 0, 0]);
        assert_eq!(
            f.check(&ns, Direction::Out, now),
            Verdict::Allow,
            "type {ndp}"
        );
    }
    // Behind a hop-by-hop header (as MLD reports are) ICMPv6 is still found.
    let hbh = [PROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0, 135, 0, 0, 0];
    let behind = ipv6(GUEST6, "ff02::1", 0, &hbh);
    assert_eq!(f.check(&behind, Direction::Out, now), Verdict::Allow);
    assert_eq!(
        f.check(&eth(0x88B5, b"raw"), Direction::Out, now),
        Verdict::Deny
    );
    assert_eq!(f.check(&[0u8; 5], Direction::Out, now), Verdict::Deny);
    let mut open = Filter::new(Verdict::Allow, vec![]);
    assert_eq!(
        open.check(&eth(0x88B5, b"raw"), Direction::Out, now),
        Verdict::Allow
    );
}

#[test]
fn later_fragments_and_truncated_headers_never_match_a_port_rule() {
    let mut f = office();
    let now = Instant::now();
    // A non-first fragment has no ports: only port-less rules or the default decide.
    let frag = ipv4(GUEST4, [10, 1, 2, 3], PROTO_TCP, 100, &ports(40000, 443));
    assert_eq!(f.check(&frag, Direction::Out, now), Verdict::Deny);
    let truncated = ipv4(GUEST4, [10, 1, 2, 3], PROTO_TCP, 0, &[0x9c]);
    assert_eq!(f.check(&truncated, Direction::Out, now), Verdict::Deny);
    // Every prefix of a valid frame is decided without a panic.
    let full = ipv6(GUEST6, "fd00:1::53", PROTO_UDP, &ports(1, 53));
    for n in 0..full.len() {
        let _ = f.check(&full[..n], Direction::Out, now);
        let _ = f.check(&full[..n], Direction::In, now);
    }
}

#[test]
fn the_flow_table_is_bounded() {
    let mut f = Filter::new(Verdict::Allow, vec![]);
    let now = Instant::now();
    for i in 0..(MAX_FLOWS + 100) {
        let port = u16::try_from(i % 60000).unwrap();
        let dst = [10, 9, u8::try_from(i / 60000).unwrap(), 1];
        f.check(
            &ipv4(GUEST4, dst, PROTO_UDP, 0, &ports(port, 53)),
            Direction::Out,
            now,
        );
    }
    assert_eq!(f.flow_count(), MAX_FLOWS);
}

#[test]
fn blocks_parse_and_contain() {
    let n = IpNet::parse("10.0.0.0/8").unwrap();
    assert!(n.contains("10.255.0.1".parse().unwrap()));
    assert!(!n.contains("11.0.0.1".parse().unwrap()));
    assert!(!n.contains("::a00:1".parse().unwrap()));
    assert!(IpNet::parse("0.0.0.0/0")
        .unwrap()
        .contains("1.2.3.4".parse().unwrap()));
    assert!(IpNet::parse("::/0")
        .unwrap()
        .contains("fd00::1".parse().unwrap()));
    assert!(IpNet::parse("fd00::1")
        .unwrap()
        .contains("fd00::1".parse().unwrap()));
    assert!(IpNet::parse("10.0.0.0/33").is_err());
    assert!(IpNet::parse("nope/8").is_err());
}

#[test]
fn refused_frames_are_reported_at_most_every_ten_seconds() {
    let mut f = office();
    let t0 = Instant::now();
    assert_eq!(f.report_due(t0), None, "nothing refused yet");
    let bad = ipv4(GUEST4, [10, 1, 2, 3], PROTO_TCP, 0, &ports(40000, 80));
    assert_eq!(f.check(&bad, Direction::Out, t0), Verdict::Deny);
    let first = f.report_due(t0).unwrap();
    assert!(
        first.contains("dropped 1 frames from the guest")
            && first.ends_with("out tcp 10.0.0.2:40000 -> 10.1.2.3:80"),
        "{first}"
    );
    for _ in 0..1000 {
        f.check(&bad, Direction::Out, t0);
    }
    assert_eq!(f.report_due(t0 + Duration::from_secs(9)), None);
    let next = f.report_due(t0 + REPORT_EVERY).unwrap();
    assert!(next.contains("dropped 1000 frames"), "{next}");
    assert_eq!(f.stats().out_dropped, 1001);
}

#[test]
fn refusals_are_tallied_per_rule_until_taken_and_survive_a_replacement() {
    let mut f = office();
    let t0 = Instant::now();
    assert!(f.take_drops().is_empty(), "nothing refused yet");
    // Rule 1 refuses 10.1.9.9 whatever the port; the default refuses the rest.
    let banned = ipv4(GUEST4, [10, 1, 9, 9], PROTO_TCP, 0, &ports(40000, 443));
    let elsewhere = ipv4(GUEST4, [192, 0, 2, 1], PROTO_UDP, 0, &ports(40001, 53));
    let inbound = ipv4([192, 0, 2, 7], GUEST4, PROTO_TCP, 0, &ports(5555, 22));
    let allowed = ipv4(GUEST4, [10, 1, 2, 3], PROTO_TCP, 0, &ports(40002, 443));
    for _ in 0..500 {
        assert_eq!(f.check(&banned, Direction::Out, t0), Verdict::Deny);
    }
    for _ in 0..3 {
        assert_eq!(f.check(&elsewhere, Direction::Out, t0), Verdict::Deny);
        assert_eq!(f.check(&inbound, Direction::In, t0), Verdict::Deny);
    }
    assert_eq!(f.check(&allowed, Direction::Out, t0), Verdict::Allow);
    let drops = f.take_drops();
    assert_eq!(
        drops,
        vec![
            DropTally {
                rule: "rule 1 (deny any 10.1.9.9/32)".into(),
                out: 500,
                inn: 0,
                last: "out tcp 10.0.0.2:40000 -> 10.1.9.9:443".into(),
            },
            DropTally {
                rule: "default (deny)".into(),
                out: 3,
                inn: 3,
                last: "in tcp 192.0.2.7:5555 -> 10.0.0.2:22".into(),
            },
        ]
    );
    assert!(
        f.take_drops().is_empty(),
        "taken tallies start again from zero"
    );

    // Refusals not taken before a policy change are kept, marked as the old policy's.
    f.check(&banned, Direction::Out, t0);
    let mut replacement = Filter::new(
        Verdict::Allow,
        vec![rule(Verdict::Deny, None, Proto::Udp, Some((53, 53)))],
    )
    .with_counts_of(&mut f);
    assert_eq!(
        replacement.check(&elsewhere, Direction::Out, t0),
        Verdict::Deny
    );
    assert_eq!(
        replacement.check(&banned, Direction::Out, t0),
        Verdict::Allow
    );
    let drops: Vec<(String, u64)> = replacement
        .take_drops()
        .into_iter()
        .map(|t| (t.rule, t.out))
        .collect();
    assert_eq!(
        drops,
        vec![
            ("rule 1 (deny any 10.1.9.9/32), replaced".to_string(), 1),
            ("rule 1 (deny udp port 53)".to_string(), 1),
        ]
    );
    assert_eq!(
        replacement.stats().out_dropped,
        505,
        "the totals carry over"
    );
}

#[test]
fn tallies_of_many_replaced_policies_stay_bounded() {
    let mut f = office();
    let t0 = Instant::now();
    let banned = ipv4(GUEST4, [10, 1, 9, 9], PROTO_TCP, 0, &ports(40000, 443));
    for _ in 0..(MAX_CARRIED_TALLIES * 3) {
        f.check(&banned, Direction::Out, t0);
        f = office().with_counts_of(&mut f);
    }
    let drops = f.take_drops();
    assert_eq!(drops.len(), MAX_CARRIED_TALLIES);
    let total: u64 = drops.iter().map(|t| t.out).sum();
    assert_eq!(total, MAX_CARRIED_TALLIES as u64 * 3, "merged, not lost");
}

fn udp(src: u16, dst: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = src.to_be_bytes().to_vec();
    l4.extend_from_slice(&dst.to_be_bytes());
    l4.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    l4
}

const RESOLVER: [u8; 4] = [10, 0, 0, 53];

/// deny by default; DNS to the resolver; TCP 443 to *.corp.example.
fn by_name() -> Filter {
    Filter::new(
        Verdict::Deny,
        vec![
            rule(
                Verdict::Allow,
                Some("10.0.0.53/32"),
                Proto::Udp,
                Some((53, 53)),
            ),
            Rule {
                name: Some(NamePattern::parse("*.corp.example").unwrap()),
                ..rule(Verdict::Allow, None, Proto::Tcp, Some((443, 443)))
            },
        ],
    )
    .with_dns(vec![IpAddr::from(RESOLVER)])
}

fn query_frame(port: u16, id: u16, name: &str) -> Vec<u8> {
    ipv4(
        GUEST4,
        RESOLVER,
        PROTO_UDP,
        0,
        &udp(port, 53, &dns::tests::query(id, name)),
    )
}

fn answer_frame(from: [u8; 4], port: u16, id: u16, name: &str, addr: [u8; 4], ttl: u32) -> Vec<u8> {
    let msg = dns::tests::answer(id, name, Some("edge.cdn.example"), &[addr], ttl);
    ipv4(from, GUEST4, PROTO_UDP, 0, &udp(53, port, &msg))
}

#[test]
fn a_name_rule_admits_the_addresses_a_trusted_answer_gives_for_their_ttl() {
    let mut f = by_name();
    let t0 = Instant::now();
    let https = |to: [u8; 4], port: u16| ipv4(GUEST4, to, PROTO_TCP, 0, &ports(port, 443));
    assert_eq!(
        f.check(&https([192, 0, 2, 5], 40000), Direction::Out, t0),
        Verdict::Deny,
        "not learnt yet"
    );
    assert_eq!(
        f.check(
            &query_frame(5353, 7, "www.corp.example"),
            Direction::Out,
            t0
        ),
        Verdict::Allow
    );
    assert_eq!(
        f.check(
            &answer_frame(RESOLVER, 5353, 7, "www.corp.example", [192, 0, 2, 5], 120),
            Direction::In,
            t0
        ),
        Verdict::Allow
    );
    assert_eq!(f.learnt_count(), 1);
    assert_eq!(
        f.check(&https([192, 0, 2, 5], 40001), Direction::Out, t0),
        Verdict::Allow
    );
    // Only what the rule says: another port of the same address is not admitted.
    let http = ipv4(GUEST4, [192, 0, 2, 5], PROTO_TCP, 0, &ports(40002, 80));
    assert_eq!(f.check(&http, Direction::Out, t0), Verdict::Deny);
    // The connection made goes on past the TTL; a new one then is refused.
    let later = t0 + Duration::from_secs(121);
    assert_eq!(
        f.check(&https([192, 0, 2, 5], 40001), Direction::Out, later),
        Verdict::Allow
    );
    assert_eq!(
        f.check(&https([192, 0, 2, 5], 40003), Direction::Out, later),
        Verdict::Deny
    );
    // A TTL of 0 still leaves the guest MIN_TTL to connect.
    f.check(&query_frame(5353, 8, "db.corp.example"), Direction::Out, t0);
    f.check(
        &answer_frame(RESOLVER, 5353, 8, "db.corp.example", [192, 0, 2, 6], 0),
        Direction::In,
        t0,
    );
    assert_eq!(
        f.check(
            &https([192, 0, 2, 6], 40004),
            Direction::Out,
            t0 + MIN_TTL - Duration::from_secs(1)
        ),
        Verdict::Allow
    );
    assert_eq!(
        f.check(&https([192, 0, 2, 6], 40005), Direction::Out, t0 + MIN_TTL),
        Verdict::Deny
    );
}

#[test]
fn answers_nobody_asked_for_or_from_elsewhere_teach_nothing() {
    let mut f = by_name();
    let t0 = Instant::now();
    let https = ipv4(GUEST4, [192, 0, 2, 9], PROTO_TCP, 0, &ports(40000, 443));
    let learns = |f: &mut Filter, answer: Vec<u8>| {
        f.check(&answer, Direction::In, t0);
        f.check(&https, Direction::Out, t0) == Verdict::Allow
    };
    // No query: an answer arriving (even on an allowed flow) is not believed.
    f.check(
        &query_frame(5353, 1, "www.corp.example"),
        Direction::Out,
        t0,
    );
    assert!(
        !learns(
            &mut f,
            answer_frame(RESOLVER, 5353, 2, "www.corp.example", [192, 0, 2, 9], 60)
        ),
        "wrong id"
    );
    assert!(
        !learns(
            &mut f,
            answer_frame(RESOLVER, 5353, 1, "evil.corp.example", [192, 0, 2, 9], 60)
        ),
        "another name"
    );
    assert!(
        !learns(
            &mut f,
            answer_frame(RESOLVER, 5354, 1, "www.corp.example", [192, 0, 2, 9], 60)
        ),
        "another port"
    );
    assert!(
        !learns(
            &mut f,
            answer_frame(
                [10, 0, 0, 66],
                5353,
                1,
                "www.corp.example",
                [192, 0, 2, 9],
                60
            )
        ),
        "another server"
    );
    // A query for a name no rule covers is not even remembered.
    f.check(&query_frame(5353, 3, "www.example.org"), Direction::Out, t0);
    assert!(!learns(
        &mut f,
        answer_frame(RESOLVER, 5353, 3, "www.example.org", [192, 0, 2, 9], 60)
    ));
    // Too late.
    let late = answer_frame(RESOLVER, 5353, 1, "www.corp.example", [192, 0, 2, 9], 60);
    f.check(&late, Direction::In, t0 + QUERY_WAIT);
    assert_eq!(
        f.check(&https, Direction::Out, t0 + QUERY_WAIT),
        Verdict::Deny
    );
    // A guest's own "answer" sent out is not an answer.
    f.check(
        &query_frame(5353, 4, "www.corp.example"),
        Direction::Out,
        t0,
    );
    let forged = ipv4(
        GUEST4,
        RESOLVER,
        PROTO_UDP,
        0,
        &udp(
            5353,
            53,
            &dns::tests::answer(4, "www.corp.example", None, &[[192, 0, 2, 9]], 60),
        ),
    );
    f.check(&forged, Direction::Out, t0);
    assert_eq!(f.check(&https, Direction::Out, t0), Verdict::Deny);
    assert_eq!(f.learnt_count(), 0);
    // The real one, once: a second copy is not needed and changes nothing.
    assert!(learns(
        &mut f,
        answer_frame(RESOLVER, 5353, 4, "www.corp.example", [192, 0, 2, 9], 60)
    ));
}

#[test]
fn learnt_addresses_and_queries_in_flight_are_bounded_and_survive_a_replacement() {
    let mut f = by_name();
    let t0 = Instant::now();
    for i in 0..(MAX_LEARNT + 100) {
        let id = u16::try_from(i % 60_000).unwrap();
        let [.., hi, lo] = u32::try_from(i).unwrap().to_be_bytes();
        let addr = [172, 16, hi, lo];
        f.check(
            &query_frame(5353, id, "www.corp.example"),
            Direction::Out,
            t0,
        );
        f.check(
            &answer_frame(RESOLVER, 5353, id, "www.corp.example", addr, 60),
            Direction::In,
            t0,
        );
    }
    assert_eq!(f.learnt_count(), MAX_LEARNT);
    for i in 0..u16::try_from(MAX_PENDING_QUERIES * 2).unwrap() {
        f.check(&query_frame(6000, i, "q.corp.example"), Direction::Out, t0);
    }
    assert!(f.pending.len() <= MAX_PENDING_QUERIES);
    // What answers taught survives a policy change (their TTL still runs).
    let mut f = by_name();
    f.check(
        &query_frame(5353, 1, "www.corp.example"),
        Direction::Out,
        t0,
    );
    f.check(
        &answer_frame(RESOLVER, 5353, 1, "www.corp.example", [192, 0, 2, 9], 60),
        Direction::In,
        t0,
    );
    let mut g = by_name().with_counts_of(&mut f);
    let https = ipv4(GUEST4, [192, 0, 2, 9], PROTO_TCP, 0, &ports(40000, 443));
    assert_eq!(
        g.check(&https, Direction::Out, t0),
        Verdict::Allow,
        "learnt before the replacement"
    );
}
