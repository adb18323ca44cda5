//! The network policy in the VMM's virtio-net path, with real traffic: the probe guest sends
//! IPv4, IPv6 and ARP frames to allowed and refused addresses and ports over a TAP in a
//! network namespace the test makes; only the allowed ones arrive on the TAP. The host then
//! answers: a reply to an allowed flow reaches the guest, unsolicited frames do not. The rule
//! lives in the VMM's configuration (what the handset writes from the profile's signed
//! policy), out of the guest's reach.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use e2e::host::{format_mac, NetNs, PacketSocket};
use e2e::{require_kvm, skip, VmCommand};

const GUEST_MAC: [u8; 6] = [0x02, 0x50, 0x56, 0x00, 0x00, 0x17];
const HOST_MAC: [u8; 6] = [0x02, 0x50, 0x56, 0x00, 0x00, 0x11];
const GUEST4: [u8; 4] = [10, 0, 0, 2];
const GUEST6: &str = "fd00::2";

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// A UDP (17) or TCP (6) IPv4 packet with `payload` after the ports (TCP: a bare header).
fn ipv4(proto: u8, src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let l4_len = if proto == 6 { 20 } else { 8 };
    let total = u16::try_from(20 + l4_len + payload.len()).unwrap();
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.0);
    p.extend_from_slice(&dst.0);
    p.extend_from_slice(&src.1.to_be_bytes());
    p.extend_from_slice(&dst.1.to_be_bytes());
    p.resize(20 + l4_len, 0);
    if proto == 6 {
        p[32] = 0x50; // data offset 5
        p[33] = 0x02; // SYN
    }
    p.extend_from_slice(payload);
    p
}

/// A UDP IPv6 packet.
fn ipv6(src: (&str, u16), dst: (&str, u16), payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).unwrap();
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&v6(src.0));
    p.extend_from_slice(&v6(dst.0));
    p.extend_from_slice(&src.1.to_be_bytes());
    p.extend_from_slice(&dst.1.to_be_bytes());
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// An ARP request for 10.0.0.1 from the guest.
fn arp() -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(&GUEST_MAC);
    p.extend_from_slice(&GUEST4);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&[10, 0, 0, 1]);
    p
}

fn eth(ethertype: u16, l3: &[u8]) -> String {
    let mut f = HOST_MAC.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(l3);
    f.iter().map(|b| format!("{b:02x}")).collect()
}

/// The marker (an ASCII word after the headers) of a frame the guest sent.
fn marker(frame: &[u8]) -> Option<String> {
    let text: String = frame
        .iter()
        .map(|&b| {
            if b.is_ascii_lowercase() || b == b'-' {
                b as char
            } else {
                ' '
            }
        })
        .collect();
    text.split_whitespace()
        .find(|w| w.starts_with("m-"))
        .map(str::to_string)
}

#[test]
fn only_traffic_the_policy_allows_crosses_the_tap_either_way() {
    let name = "only_traffic_the_policy_allows_crosses_the_tap_either_way";
    if !require_kvm(name) {
        return;
    }
    if e2e::host::which("ip").is_none() || !std::path::Path::new("/dev/net/tun").exists() {
        skip("no ip(8) or /dev/net/tun", name);
        return;
    }
    let ns = NetNs::create().expect("create a network namespace (needs root)");
    let tap = "pvpol0";
    ns.add_tap(tap).expect("create the tap in the namespace");
    let socks = ns
        .run_inside(move || -> std::io::Result<Vec<PacketSocket>> {
            [0x0800u16, 0x86DD, 0x0806]
                .into_iter()
                .map(|et| PacketSocket::open(tap, et))
                .collect()
        })
        .expect("packet sockets on the tap");

    // The policy: deny by default; UDP 7000 and TCP 443 to 10.0.0.1; anything to fd00::1.
    let dir = e2e::TempDir::new();
    let config = dir.join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\n[[net]]\ntap = \"{tap}\"\nmac = \"{}\"\n\
             [net.filter]\ndefault = \"deny\"\nrules = [\n\
             {{ action = \"allow\", cidr = \"10.0.0.1/32\", protocol = \"udp\", ports = [7000, 7000] }},\n\
             {{ action = \"allow\", cidr = \"10.0.0.1/32\", protocol = \"tcp\", ports = [443, 443] }},\n\
             {{ action = \"allow\", cidr = \"fd00::1/128\" }},\n]\n",
            e2e::probe_elf(),
            format_mac(&GUEST_MAC)
        ),
    )
    .unwrap();
    let frames = [
        eth(
            0x0800,
            &ipv4(
                17,
                (GUEST4, 4000),
                ([10, 0, 0, 1], 7000),
                b" m-allowed-udp ",
            ),
        ),
        eth(
            0x0800,
            &ipv4(
                17,
                (GUEST4, 4000),
                ([10, 0, 0, 1], 7001),
                b" m-refused-port ",
            ),
        ),
        eth(
            0x0800,
            &ipv4(
                17,
                (GUEST4, 4000),
                ([10, 0, 0, 9], 7000),
                b" m-refused-host ",
            ),
        ),
        eth(
            0x0800,
            &ipv4(6, (GUEST4, 4001), ([10, 0, 0, 1], 443), b" m-allowed-tcp "),
        ),
        eth(
            0x0800,
            &ipv4(6, (GUEST4, 4001), ([10, 0, 0, 1], 80), b" m-refused-tcp "),
        ),
        eth(
            0x86DD,
            &ipv6((GUEST6, 4000), ("fd00::1", 9), b" m-allowed-six "),
        ),
        eth(
            0x86DD,
            &ipv6((GUEST6, 4000), ("fd00::9", 9), b" m-refused-six "),
        ),
        eth(0x0806, &arp()),
    ];
    let cmdline = format!(
        "pv.tests=net pv.net.wait=1 pv.net.listen=4000 pv.net.frames={}",
        frames.join(",")
    );
    let mut cmd = VmCommand::probe(&cmdline).in_netns(ns.name());
    cmd.config = Some(config);
    let vm = cmd.spawn();

    // What the guest sent that arrived on the tap (the namespace's own frames, from another
    // MAC, are left out).
    let mut arrived = BTreeSet::new();
    let mut arp_seen = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !(arrived.len() >= 3 && arp_seen) {
        for (i, s) in socks.iter().enumerate() {
            if let Some(f) = s.recv(Duration::from_millis(50)).expect("recv") {
                if f.len() < 14 || f[6..12] != GUEST_MAC {
                    continue;
                }
                if i == 2 {
                    arp_seen = true;
                } else if let Some(m) = marker(&f) {
                    arrived.insert(m);
                }
            }
        }
    }
    // Replies: one to the allowed UDP flow (no rule allows 7000 -> 4000: the flow does), and
    // two that nobody asked for.
    socks[0]
        .send(
            GUEST_MAC,
            HOST_MAC,
            &ipv4(17, ([10, 0, 0, 1], 7000), (GUEST4, 4000), b" m-reply-ok "),
        )
        .unwrap();
    socks[0]
        .send(
            GUEST_MAC,
            HOST_MAC,
            &ipv4(
                17,
                ([10, 0, 0, 9], 7000),
                (GUEST4, 4000),
                b" m-unsolicited-host ",
            ),
        )
        .unwrap();
    socks[0]
        .send(
            GUEST_MAC,
            HOST_MAC,
            &ipv4(
                17,
                ([10, 0, 0, 1], 7002),
                (GUEST4, 4000),
                b" m-unsolicited-port ",
            ),
        )
        .unwrap();
    // A little later, so the frames above are decided first: more that must be dropped.
    std::thread::sleep(Duration::from_millis(200));
    let out = vm.wait();
    let report = out.assert_clean_pass();
    // Whatever else the guest still sent (the dropped ones must never appear).
    for s in &socks[..2] {
        while let Some(f) = s.recv(Duration::from_millis(10)).unwrap() {
            if f.len() >= 14 && f[6..12] == GUEST_MAC {
                if let Some(m) = marker(&f) {
                    arrived.insert(m);
                }
            }
        }
    }
    let expected: BTreeSet<String> = ["m-allowed-udp", "m-allowed-tcp", "m-allowed-six"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(arrived, expected, "{}", out.describe());
    assert!(arp_seen, "ARP always passes\n{}", out.describe());
    assert_eq!(
        report.expect(&["net", "frames"]).field_u64("sent"),
        Some(8),
        "{}",
        out.describe()
    );
    let got: Vec<String> = report
        .find_all(&["net", "rx-ip"])
        .iter()
        .filter_map(|l| marker(l.raw.as_bytes()))
        .collect();
    assert_eq!(got, vec!["m-reply-ok".to_string()], "{}", out.describe());
}

/// Sends one device request to the VMM's API socket; its answer line.
fn device_request(api: &std::path::Path, request: serde_json::Value) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(api) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no API socket: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let line = serde_json::json!({"op": "device", "id": "net0", "request": request});
    writeln!(s, "{line}").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn a_policy_replaced_through_the_api_decides_the_next_frames() {
    let name = "a_policy_replaced_through_the_api_decides_the_next_frames";
    if !require_kvm(name) {
        return;
    }
    if e2e::host::which("ip").is_none() || !std::path::Path::new("/dev/net/tun").exists() {
        skip("no ip(8) or /dev/net/tun", name);
        return;
    }
    let ns = NetNs::create().expect("create a network namespace (needs root)");
    let tap = "pvpol1";
    ns.add_tap(tap).expect("create the tap in the namespace");
    let socks = ns
        .run_inside(move || -> std::io::Result<Vec<PacketSocket>> {
            [0x0800u16, 0x0806]
                .into_iter()
                .map(|et| PacketSocket::open(tap, et))
                .collect()
        })
        .expect("packet sockets on the tap");
    // The VM starts denying everything; the guest sends one ARP request (always let
    // through: the sign it listens) and then listens.
    let dir = e2e::TempDir::new();
    let config = dir.join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\n[[net]]\ntap = \"{tap}\"\nmac = \"{}\"\n\
             [net.filter]\ndefault = \"deny\"\n",
            e2e::probe_elf(),
            format_mac(&GUEST_MAC)
        ),
    )
    .unwrap();
    let api = dir.join("api.sock");
    let cmdline = format!(
        "pv.tests=net pv.net.wait=1 pv.net.listen=6000 pv.net.frames={}",
        eth(0x0806, &arp())
    );
    let mut cmd = VmCommand::probe(&cmdline).in_netns(ns.name());
    cmd.config = Some(config);
    cmd.extra = vec!["--api-socket".into(), api.to_str().unwrap().into()];
    let vm = cmd.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut listening = false;
    while Instant::now() < deadline && !listening {
        if let Some(f) = socks[1].recv(Duration::from_millis(50)).expect("recv") {
            listening = f.len() >= 14 && f[6..12] == GUEST_MAC;
        }
    }
    assert!(listening, "the guest's ARP request never arrived");
    let to_guest = |payload: &[u8]| {
        socks[0]
            .send(
                GUEST_MAC,
                HOST_MAC,
                &ipv4(17, ([10, 0, 0, 1], 7000), (GUEST4, 4000), payload),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
    };
    to_guest(b" m-denied-before ");
    // A peer opening to the guest: the service port is the guest's.
    let allow = serde_json::json!({"op": "set_filter", "filter": {"default": "deny", "rules": [
        {"action": "allow", "cidr": "10.0.0.1/32", "protocol": "udp", "ports": [4000, 4000]}]}});
    let answer = device_request(&api, allow);
    assert_eq!(answer["ok"], true, "{answer}");
    to_guest(b" m-allowed-after ");
    // Denied again: the flow the last frame made is forgotten with the rules that made it.
    let deny = serde_json::json!({"op": "set_filter", "filter": {"default": "deny"}});
    let answer = device_request(&api, deny);
    assert_eq!(answer["ok"], true, "{answer}");
    to_guest(b" m-denied-again ");
    let stats = device_request(&api, serde_json::json!({"op": "filter"}));
    let out = vm.wait();
    let report = out.assert_clean_pass();
    let got: Vec<String> = report
        .find_all(&["net", "rx-ip"])
        .iter()
        .filter_map(|l| marker(l.raw.as_bytes()))
        .collect();
    assert_eq!(
        got,
        vec!["m-allowed-after".to_string()],
        "{}",
        out.describe()
    );
    let stats: serde_json::Value =
        serde_json::from_str(stats["info"].as_str().expect("an info string")).unwrap();
    // The two denied frames at least (the namespace may send its own, e.g. MLD reports).
    assert!(
        stats["in_dropped"].as_u64() >= Some(2),
        "{stats}\n{}",
        out.describe()
    );
    assert_eq!(stats["installed"], true, "{stats}");
}

/// A DNS name in wire format.
fn dns_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in name.split('.') {
        out.push(u8::try_from(l.len()).unwrap());
        out.extend_from_slice(l.as_bytes());
    }
    out.push(0);
    out
}

/// A DNS query (id 0x5150) for the A records of `name`.
fn dns_query(name: &str) -> Vec<u8> {
    let mut m = vec![0x51, 0x50, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&dns_name(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    m
}

#[test]
fn a_name_rule_admits_what_the_trusted_resolver_answered() {
    let name = "a_name_rule_admits_what_the_trusted_resolver_answered";
    if !require_kvm(name) {
        return;
    }
    if e2e::host::which("ip").is_none() || !std::path::Path::new("/dev/net/tun").exists() {
        skip("no ip(8) or /dev/net/tun", name);
        return;
    }
    const RESOLVER: [u8; 4] = [10, 0, 0, 53];
    const WWW: [u8; 4] = [10, 0, 0, 80];
    const OTHER: [u8; 4] = [10, 0, 0, 81];
    let ns = NetNs::create().expect("create a network namespace (needs root)");
    let tap = "pvdns0";
    ns.add_tap(tap).expect("create the tap in the namespace");
    let sock = ns
        .run_inside(move || PacketSocket::open(tap, 0x0800))
        .expect("a packet socket on the tap");
    // Deny by default; DNS to the resolver; UDP 7000 to *.corp.example, by name only.
    let dir = e2e::TempDir::new();
    let config = dir.join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\n[[net]]\ntap = \"{tap}\"\nmac = \"{}\"\n\
             [net.filter]\ndefault = \"deny\"\ndns_servers = [\"10.0.0.53\"]\nrules = [\n\
             {{ action = \"allow\", cidr = \"10.0.0.53/32\", protocol = \"udp\", ports = [53, 53] }},\n\
             {{ action = \"allow\", name = \"*.corp.example\", protocol = \"udp\", ports = [7000, 7000] }},\n]\n",
            e2e::probe_elf(),
            format_mac(&GUEST_MAC)
        ),
    )
    .unwrap();
    // The guest asks for www.corp.example, waits for the answer, then sends to the address
    // it got (allowed), to another address the answer named for another name, and to the
    // right address on a port the rule does not list (both refused).
    let frames = [
        eth(
            0x0800,
            &ipv4(
                17,
                (GUEST4, 5353),
                (RESOLVER, 53),
                &dns_query("www.corp.example"),
            ),
        ),
        "rx".to_string(),
        eth(
            0x0800,
            &ipv4(17, (GUEST4, 4000), (WWW, 7000), b" m-www-ok "),
        ),
        eth(
            0x0800,
            &ipv4(17, (GUEST4, 4000), (OTHER, 7000), b" m-other-host "),
        ),
        eth(
            0x0800,
            &ipv4(17, (GUEST4, 4000), (WWW, 7001), b" m-www-port "),
        ),
    ];
    let cmdline = format!(
        "pv.tests=net pv.net.wait=1 pv.net.listen=500 pv.net.frames={}",
        frames.join(",")
    );
    let mut cmd = VmCommand::probe(&cmdline).in_netns(ns.name());
    cmd.config = Some(config);
    let vm = cmd.spawn();

    // The query arrives on the tap; the resolver's answer goes back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let query = loop {
        assert!(Instant::now() < deadline, "no DNS query from the guest");
        if let Some(f) = sock.recv(Duration::from_millis(50)).expect("recv") {
            if f.len() > 42 && f[6..12] == GUEST_MAC && f[36..38] == [0, 53] {
                break f;
            }
        }
    };
    assert_eq!(
        query[42..44],
        [0x51, 0x50],
        "the guest's query went out as sent"
    );
    let mut answer = dns_query("www.corp.example");
    answer[2..4].copy_from_slice(&[0x81, 0x80]);
    answer[6..8].copy_from_slice(&[0, 2]);
    answer.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4]);
    answer.extend_from_slice(&WWW);
    answer.extend_from_slice(&dns_name("other.example"));
    answer.extend_from_slice(&[0, 1, 0, 1, 0, 0, 1, 44, 0, 4]);
    answer.extend_from_slice(&OTHER);
    sock.send(
        GUEST_MAC,
        HOST_MAC,
        &ipv4(17, (RESOLVER, 53), (GUEST4, 5353), &answer),
    )
    .unwrap();

    let mut arrived = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && arrived.is_empty() {
        if let Some(f) = sock.recv(Duration::from_millis(50)).expect("recv") {
            if f.len() >= 14 && f[6..12] == GUEST_MAC {
                arrived.extend(marker(&f));
            }
        }
    }
    let out = vm.wait();
    let report = out.assert_clean_pass();
    while let Some(f) = sock.recv(Duration::from_millis(10)).unwrap() {
        if f.len() >= 14 && f[6..12] == GUEST_MAC {
            arrived.extend(marker(&f));
        }
    }
    assert_eq!(
        arrived,
        BTreeSet::from(["m-www-ok".to_string()]),
        "{}",
        out.describe()
    );
    let got = report.find_all(&["net", "rx-ip"]);
    assert!(
        got.len() == 1 && !got[0].raw.contains("rx-ip none"),
        "the guest got the answer\n{}",
        out.describe()
    );
}
