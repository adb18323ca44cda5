// Test data: hand-built guest-side values and small constants, narrowed on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::RawFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::chain::DESC_F_WRITE;
use crate::virtio::worker::testing::*;

/// A datagram socket pair end: one datagram is one frame.
struct Dgram(UnixDatagram);

impl AsRawFd for Dgram {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Dgram {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
}

struct Setup {
    net: Net,
    mem: GuestMem,
    rxq: TestQueue,
    txq: TestQueue,
    kicks: Vec<EventFd>,
    irq: Arc<FakeInterrupt>,
    peer: UnixDatagram,
}

use vmm_sys_util::eventfd::EventFd;

fn setup() -> Setup {
    setup_with(None)
}

fn setup_with(filter: Option<Filter>) -> Setup {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut net = Net::with_backend(Arc::new(Dgram(ours)), Some([2, 0, 0, 0, 0, 1])).unwrap();
    if let Some(f) = filter {
        net = net.with_filter(f);
    }
    net.ack_features(net.device_features());
    let mem = test_mem();
    let rxq = TestQueue::new(0x1000, 16);
    let txq = TestQueue::new(0x2000, 16);
    let irq = FakeInterrupt::new();
    let (queues, kicks) = active_queues(&[rxq, txq]);
    net.activate(mem.clone(), irq.clone(), queues).unwrap();
    Setup {
        net,
        mem,
        rxq,
        txq,
        kicks,
        irq,
        peer,
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(3) ^ seed));
    f
}

#[test]
fn tx_sends_frames_with_a_clean_header() {
    let s = setup();
    let mut hdr = [0xEEu8; VNET_HDR_LEN];
    hdr[0] = 1; // NEEDS_CSUM, which was not negotiated
    s.mem.write_slice(&hdr, GuestAddress(0x10000)).unwrap();
    let payload = frame(60, 7);
    s.mem
        .write_slice(&payload[VNET_HDR_LEN..], GuestAddress(0x10100))
        .unwrap();
    s.txq
        .add_chain(&s.mem, 0, &[(0x10000, 12, 0), (0x10100, 60, 0)]);
    s.kicks[TX].write(1).unwrap();
    let mut got = [0u8; 200];
    let n = s.peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &payload[..]);
    assert!(wait_until(|| s.txq.used_idx(&s.mem) == 1));
    assert_eq!(s.txq.used_elem(&s.mem, 0), (0, 0));
    assert!(wait_until(|| s.irq.signals_for(1) == 1));

    // A chain shorter than the header or with a writable part is dropped, not sent.
    s.txq.add_chain(&s.mem, 2, &[(0x10000, 8, 0)]);
    s.txq
        .add_chain(&s.mem, 3, &[(0x10000, 12, 0), (0x10100, 60, DESC_F_WRITE)]);
    s.kicks[TX].write(1).unwrap();
    assert!(wait_until(|| s.txq.used_idx(&s.mem) == 3));
    s.peer.set_nonblocking(true).unwrap();
    assert!(s.peer.recv(&mut got).is_err(), "nothing else was sent");
    assert_eq!(s.irq.errors(), 0);
}

#[test]
fn rx_delivers_frames_into_buffers() {
    let s = setup();
    s.rxq.add_chain(&s.mem, 0, &[(0x20000, 1526, DESC_F_WRITE)]);
    s.rxq.add_chain(
        &s.mem,
        1,
        &[(0x30000, 12, DESC_F_WRITE), (0x30100, 1514, DESC_F_WRITE)],
    );
    s.kicks[RX].write(1).unwrap();
    let mut f1 = frame(100, 1);
    f1[0] = 2; // DATA_VALID from the host: not negotiated, must not reach the guest
    let f2 = frame(1514, 2);
    s.peer.send(&f1).unwrap();
    s.peer.send(&f2).unwrap();
    assert!(wait_until(|| s.rxq.used_idx(&s.mem) == 2));
    assert_eq!(s.rxq.used_elem(&s.mem, 0), (0, f1.len() as u32));
    assert_eq!(s.rxq.used_elem(&s.mem, 1), (1, f2.len() as u32));
    let mut got = vec![0u8; f1.len()];
    s.mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
    assert_eq!(&got[..10], &[0u8; 10]);
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers is 1");
    assert_eq!(&got[12..], &f1[12..]);
    let mut got = vec![0u8; 1514];
    s.mem.read_slice(&mut got, GuestAddress(0x30100)).unwrap();
    assert_eq!(&got[..], &f2[12..]);
    assert!(wait_until(|| s.irq.signals_for(0) >= 1));
}

#[test]
fn rx_waits_for_buffers_and_drops_oversized_frames() {
    let s = setup();
    // Frames arrive before any buffer: nothing happens.
    let frames = [frame(40, 1), frame(300, 2), frame(50, 3), frame(2, 4)];
    for f in &frames {
        s.peer.send(f).unwrap();
    }
    s.peer.send(&[1, 2, 3]).unwrap(); // shorter than a header: dropped
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.rxq.used_idx(&s.mem), 0);

    // One small buffer: frame 1 fits; after a kick it is delivered.
    s.rxq.add_chain(&s.mem, 0, &[(0x20000, 100, DESC_F_WRITE)]);
    s.kicks[RX].write(1).unwrap();
    assert!(wait_until(|| s.rxq.used_idx(&s.mem) == 1));
    assert_eq!(s.rxq.used_elem(&s.mem, 0), (0, 52));
    // Next buffer is also 100 bytes: frame 2 (312 bytes) is dropped, frame 3 lands in it.
    s.rxq.add_chain(&s.mem, 1, &[(0x20000, 100, DESC_F_WRITE)]);
    s.rxq.add_chain(&s.mem, 2, &[(0x21000, 100, DESC_F_WRITE)]);
    s.kicks[RX].write(1).unwrap();
    assert!(wait_until(|| s.rxq.used_idx(&s.mem) == 3));
    assert_eq!(s.rxq.used_elem(&s.mem, 1), (1, 62));
    assert_eq!(s.rxq.used_elem(&s.mem, 2), (2, 14));
    let mut got = [0u8; 50];
    s.mem
        .read_slice(&mut got, GuestAddress(0x20000 + 12))
        .unwrap();
    assert_eq!(&got[..], &frames[2][12..]);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(s.rxq.used_idx(&s.mem), 3, "the runt was dropped");
    assert_eq!(s.irq.errors(), 0);
    drop(s.net);
}

#[test]
fn config_and_reset() {
    let mut s = setup();
    let mut cfg = [0u8; 8];
    s.net.read_config(0, &mut cfg);
    assert_eq!(cfg, [2, 0, 0, 0, 0, 1, 1, 0]);
    s.net.reset();
    // Activate again on fresh queues; tx still works.
    s.net.ack_features(s.net.device_features());
    let txq = TestQueue::new(0x5000, 16);
    let rxq = TestQueue::new(0x4000, 16);
    let (queues, kicks) = active_queues(&[rxq, txq]);
    s.net
        .activate(s.mem.clone(), s.irq.clone(), queues)
        .unwrap();
    s.txq = txq;
    s.txq.add_chain(&s.mem, 0, &[(0x10000, 20, 0)]);
    kicks[TX].write(1).unwrap();
    let mut got = [0u8; 64];
    assert_eq!(s.peer.recv(&mut got).unwrap(), 20);
    // A random MAC is unicast and locally administered.
    let (a, _b) = UnixDatagram::pair().unwrap();
    let net = Net::with_backend(Arc::new(Dgram(a)), None).unwrap();
    assert_eq!(net.mac()[0] & 0x03, 0x02);
}

/// Smoke test against a real TAP: a frame the guest transmits is received by the interface.
#[test]
fn tap_smoke() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED tap_smoke: /dev/net/tun is missing");
        return;
    }
    let name = format!("pvt{}", std::process::id() % 100_000);
    let mut net = match Net::new_tap(&name, None) {
        Ok(net) => net,
        Err(e) => {
            eprintln!("SKIPPED tap_smoke: cannot create a tap: {e}");
            return;
        }
    };
    let up = std::process::Command::new("ip")
        .args(["link", "set", "dev", &name, "up"])
        .status();
    if !matches!(up, Ok(s) if s.success()) {
        eprintln!("SKIPPED tap_smoke: cannot bring {name} up");
        return;
    }
    let stat = |what: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{what}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = stat("rx_packets");
    net.ack_features(net.device_features());
    let mem = test_mem();
    let rxq = TestQueue::new(0x1000, 16);
    let txq = TestQueue::new(0x2000, 16);
    let irq = FakeInterrupt::new();
    let (queues, kicks) = active_queues(&[rxq, txq]);
    net.activate(mem.clone(), irq.clone(), queues).unwrap();
    // A broadcast ARP request from the guest's MAC.
    let mac = net.mac();
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend([0xFF; 6]);
    f.extend(mac);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend(mac);
    f.extend([10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
    f.resize(VNET_HDR_LEN + 60, 0);
    mem.write_slice(&f, GuestAddress(0x10000)).unwrap();
    txq.add_chain(&mem, 0, &[(0x10000, f.len() as u32, 0)]);
    kicks[TX].write(1).unwrap();
    assert!(wait_until(|| txq.used_idx(&mem) == 1));
    assert!(
        wait_until(|| stat("rx_packets") > before),
        "the tap did not receive the guest's frame"
    );
    net.reset();
}

/// A UDP/IPv4 frame (vnet header first) from `src` to `dst`.
fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    f.extend_from_slice(&[0, 8, 0, 0]);
    f
}

#[test]
fn the_network_policy_drops_refused_frames_both_ways_and_counts_them() {
    const GUEST: [u8; 4] = [10, 0, 0, 2];
    const ALLOWED: [u8; 4] = [10, 0, 0, 1];
    const REFUSED: [u8; 4] = [10, 0, 0, 9];
    let filter = Filter::new(
        Verdict::Deny,
        vec![Rule {
            verdict: Verdict::Allow,
            net: Some(IpNet::parse("10.0.0.1").unwrap()),
            name: None,
            proto: Proto::Udp,
            ports: Some((7000, 7000)),
        }],
    );
    let s = setup_with(Some(filter));
    // tx: the refused frames (wrong host, wrong port) never reach the backend.
    let frames = [
        udp((GUEST, 4000), (REFUSED, 7000)),
        udp((GUEST, 4000), (ALLOWED, 7001)),
        udp((GUEST, 4000), (ALLOWED, 7000)),
    ];
    for (i, f) in frames.iter().enumerate() {
        let at = 0x10000 + 0x1000 * i as u64;
        s.mem.write_slice(f, GuestAddress(at)).unwrap();
        s.txq
            .add_chain(&s.mem, i as u16, &[(at, f.len() as u32, 0)]);
    }
    s.kicks[TX].write(1).unwrap();
    let mut got = [0u8; 200];
    let n = s.peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &frames[2][..]);
    assert!(wait_until(|| s.txq.used_idx(&s.mem) == 3));
    s.peer.set_nonblocking(true).unwrap();
    assert!(
        s.peer.recv(&mut got).is_err(),
        "only the allowed frame was sent"
    );

    // rx: an unsolicited frame from the refused host is dropped; the reply from the
    // allowed one (no rule allows 7000 -> 4000: the flow does) is delivered.
    s.rxq.add_chain(&s.mem, 0, &[(0x20000, 1526, DESC_F_WRITE)]);
    s.rxq.add_chain(&s.mem, 1, &[(0x30000, 1526, DESC_F_WRITE)]);
    s.kicks[RX].write(1).unwrap();
    let unsolicited = udp((REFUSED, 7000), (GUEST, 4000));
    let reply = udp((ALLOWED, 7000), (GUEST, 4000));
    s.peer.send(&unsolicited).unwrap();
    s.peer.send(&reply).unwrap();
    assert!(wait_until(|| s.rxq.used_idx(&s.mem) == 1));
    let mut first = vec![0u8; reply.len()];
    s.mem.read_slice(&mut first, GuestAddress(0x20000)).unwrap();
    assert_eq!(&first[VNET_HDR_LEN..], &reply[VNET_HDR_LEN..]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        s.rxq.used_idx(&s.mem),
        1,
        "the unsolicited frame was not delivered"
    );

    let control = s.net.control().expect("a filtered device takes requests");
    let stats = control
        .control(&serde_json::json!({"op": "filter"}))
        .unwrap();
    assert_eq!(stats["installed"], true);
    assert_eq!(stats["out_allowed"], 1);
    assert_eq!(stats["out_dropped"], 2);
    assert_eq!(stats["in_allowed"], 1);
    assert_eq!(stats["in_dropped"], 1);
    assert_eq!(stats["flows"], 1);
    assert_eq!(
        stats["last_dropped"],
        "in udp 10.0.0.9:7000 -> 10.0.0.2:4000"
    );
    assert!(control.control(&serde_json::json!({"op": "x"})).is_err());
}

#[test]
fn a_policy_replaced_while_the_guest_runs_decides_the_next_frames() {
    const GUEST: [u8; 4] = [10, 0, 0, 2];
    const PEER: [u8; 4] = [10, 0, 0, 1];
    let s = setup_with(None);
    let handle = s.net.filter_handle();
    assert!(!handle.installed());
    let send = |i: u16, f: &[u8]| {
        let at = 0x10000 + 0x1000 * u64::from(i);
        s.mem.write_slice(f, GuestAddress(at)).unwrap();
        s.txq.add_chain(&s.mem, i, &[(at, f.len() as u32, 0)]);
        s.kicks[TX].write(1).unwrap();
        assert!(wait_until(|| s.txq.used_idx(&s.mem) == i + 1));
    };
    let frame = udp((GUEST, 4000), (PEER, 7000));
    let mut got = [0u8; 200];
    // No policy: the frame goes out.
    send(0, &frame);
    assert_eq!(s.peer.recv(&mut got).unwrap(), frame.len());
    // A deny-all policy installed live: the same flow's next frame is dropped.
    assert_eq!(handle.replace(Some(Filter::new(Verdict::Deny, vec![]))), 0);
    send(1, &frame);
    s.peer.set_nonblocking(true).unwrap();
    assert!(s.peer.recv(&mut got).is_err(), "a denied frame went out");
    // Allowed again: it goes out, and the flow is remembered...
    let allow = Filter::new(
        Verdict::Deny,
        vec![Rule {
            verdict: Verdict::Allow,
            net: Some(IpNet::parse("10.0.0.1").unwrap()),
            name: None,
            proto: Proto::Udp,
            ports: Some((7000, 7000)),
        }],
    );
    handle.replace(Some(allow));
    send(2, &frame);
    assert!(wait_until(|| s.peer.recv(&mut got).is_ok()));
    // ...until a policy that refuses it replaces this one: the flow is forgotten, not kept.
    assert_eq!(handle.replace(Some(Filter::new(Verdict::Deny, vec![]))), 1);
    send(3, &frame);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        s.peer.recv(&mut got).is_err(),
        "an established flow outlived its policy"
    );
    // The counts went on across the changes.
    let stats = s
        .net
        .control()
        .unwrap()
        .control(&serde_json::json!({"op": "filter"}))
        .unwrap();
    assert_eq!(stats["out_dropped"], 2, "{stats}");
    assert_eq!(stats["out_allowed"], 1, "{stats}");
    // Removed: everything passes again.
    handle.replace(None);
    assert!(!handle.installed());
    send(4, &frame);
    assert!(wait_until(|| s.peer.recv(&mut got).is_ok()));
    // The two refusals, by the defaults of two policies both gone now, are still there for
    // the audit log, once.
    let control = s.net.control().unwrap();
    let taken = control
        .control(&serde_json::json!({"op": "take_drops"}))
        .unwrap();
    let drops = taken["drops"].as_array().unwrap();
    assert_eq!(drops.len(), 2, "{taken}");
    for d in drops {
        assert_eq!(d["out"], 1, "{taken}");
        assert_eq!(d["in"], 0, "{taken}");
        assert_eq!(
            d["last"], "out udp 10.0.0.2:4000 -> 10.0.0.1:7000",
            "{taken}"
        );
    }
    assert_eq!(drops[0]["rule"], "default (deny), replaced", "{taken}");
    assert_eq!(drops[1]["rule"], "default (deny), removed", "{taken}");
    let again = control
        .control(&serde_json::json!({"op": "take_drops"}))
        .unwrap();
    assert_eq!(again, serde_json::json!({"drops": []}));
}

/// A UDP/IPv4 frame (vnet header first) from `src` to `dst` carrying `payload`.
fn udp_with(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let mut f = udp(src, dst);
    let ip = VNET_HDR_LEN + 14;
    let total = (28 + payload.len()) as u16;
    f[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    f[ip + 24..ip + 26].copy_from_slice(&(total - 20).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn a_name_rule_lets_the_guest_reach_what_the_trusted_resolver_answered() {
    const GUEST: [u8; 4] = [10, 0, 0, 2];
    const RESOLVER: [u8; 4] = [10, 0, 0, 53];
    const WWW: [u8; 4] = [192, 0, 2, 80];
    let filter = Filter::new(
        Verdict::Deny,
        vec![
            Rule {
                verdict: Verdict::Allow,
                net: Some(IpNet::parse("10.0.0.53").unwrap()),
                name: None,
                proto: Proto::Udp,
                ports: Some((53, 53)),
            },
            Rule {
                verdict: Verdict::Allow,
                net: None,
                name: Some(NamePattern::parse("*.corp.example").unwrap()),
                proto: Proto::Udp,
                ports: Some((8443, 8443)),
            },
        ],
    )
    .with_dns(vec![std::net::IpAddr::from(RESOLVER)]);
    let s = setup_with(Some(filter));
    let mut got = [0u8; 400];
    let send = |i: u16, f: &[u8]| {
        let at = 0x10000 + 0x1000 * u64::from(i);
        s.mem.write_slice(f, GuestAddress(at)).unwrap();
        s.txq.add_chain(&s.mem, i, &[(at, f.len() as u32, 0)]);
        s.kicks[TX].write(1).unwrap();
        assert!(wait_until(|| s.txq.used_idx(&s.mem) == i + 1));
    };
    let to_www = udp((GUEST, 4001), (WWW, 8443));
    // Before the guest asked, the name's address is refused.
    send(0, &to_www);
    s.peer.set_nonblocking(true).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        s.peer.recv(&mut got).is_err(),
        "reached before it was resolved"
    );
    // The guest asks the resolver; the answer comes back through the device.
    let query = udp_with(
        (GUEST, 5353),
        (RESOLVER, 53),
        &filter::dns::tests::query(0x4242, "www.corp.example"),
    );
    send(1, &query);
    assert!(wait_until(|| s
        .peer
        .recv(&mut got)
        .is_ok_and(|n| n == query.len())));
    s.rxq.add_chain(&s.mem, 0, &[(0x20000, 1526, DESC_F_WRITE)]);
    s.kicks[RX].write(1).unwrap();
    let answer = udp_with(
        (RESOLVER, 53),
        (GUEST, 5353),
        &filter::dns::tests::answer(0x4242, "www.corp.example", None, &[WWW], 300),
    );
    s.peer.send(&answer).unwrap();
    assert!(
        wait_until(|| s.rxq.used_idx(&s.mem) == 1),
        "the answer reached the guest"
    );
    // Now the address is the name's: the same frame goes out; another address does not.
    send(2, &to_www);
    assert!(wait_until(|| s
        .peer
        .recv(&mut got)
        .is_ok_and(|n| n == to_www.len())));
    send(3, &udp((GUEST, 4002), ([192, 0, 2, 81], 8443)));
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        s.peer.recv(&mut got).is_err(),
        "an address nobody answered went out"
    );
}

#[test]
fn a_tap_opened_ahead_is_the_one_its_device_takes() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED a_tap_opened_ahead_is_the_one_its_device_takes: no /dev/net/tun");
        return;
    }
    let name = format!("pva{}", std::process::id() % 100_000);
    let fd = match super::open_tap_ahead(&name) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("SKIPPED a_tap_opened_ahead_is_the_one_its_device_takes: {e}");
            return;
        }
    };
    // The device takes that descriptor (a second attach to the TAP would be refused: busy).
    let tap = super::tap::Tap::open(&name).unwrap();
    assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&tap), fd);
    assert_eq!(tap.name(), name);
    // Taken once: the next open of the name attaches anew, which the held TAP refuses.
    assert!(super::tap::Tap::open(&name).is_err());
    drop(tap);
    // Opened ahead and forgotten: closed, the TAP (not persistent) gone with it.
    super::open_tap_ahead(&name).unwrap();
    super::forget_taps_ahead();
    assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
}
