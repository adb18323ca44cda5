//! virtio-net over a TAP: frames cross both ways inside a network namespace the test makes.

use std::time::{Duration, Instant};

use e2e::host::{format_mac, NetNs, PacketSocket};
use e2e::{require_kvm, skip, VmCommand};

const ETHERTYPE: u16 = 0x88B5;
const GUEST_PAYLOAD: &[u8] = b"pocketvisor-probe-net";
const HOST_PAYLOAD: &str = "pocketvisor-host-reply";
const GUEST_MAC: [u8; 6] = [0x02, 0x50, 0x56, 0x00, 0x00, 0x07];
const HOST_MAC: [u8; 6] = [0x02, 0x50, 0x56, 0x00, 0x00, 0x01];

#[test]
fn net_frames_cross_the_tap_both_ways_in_a_netns() {
    let name = "net_frames_cross_the_tap_both_ways_in_a_netns";
    if !require_kvm(name) {
        return;
    }
    if e2e::host::which("ip").is_none() || !std::path::Path::new("/dev/net/tun").exists() {
        skip("no ip(8) or /dev/net/tun", name);
        return;
    }
    let ns = NetNs::create().expect("create a network namespace (needs root)");
    let tap = "pvt0";
    ns.add_tap(tap).expect("create the tap in the namespace");
    let sock = ns
        .run_inside(move || PacketSocket::open(tap, ETHERTYPE))
        .expect("packet socket on the tap");

    let mut vm = VmCommand::probe("pv.tests=net pv.net.wait=10000")
        .net(&format!("tap={tap},mac={}", format_mac(&GUEST_MAC)))
        .in_netns(ns.name())
        .spawn();

    // Guest -> host: the probe broadcasts one frame of our ethertype.
    let deadline = Instant::now() + Duration::from_secs(30);
    let frame = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no frame from the guest on the tap\nserial:\n{}\nstderr: {}",
            vm.drain(),
            vm.stderr_so_far()
        );
        match sock
            .recv(left.min(Duration::from_millis(200)))
            .expect("recv")
        {
            Some(f) if f.len() >= 14 && f[6..12] != HOST_MAC => break f,
            _ => {}
        }
    };
    assert_eq!(&frame[0..6], &[0xff; 6], "the guest's frame is a broadcast");
    assert_eq!(&frame[6..12], &GUEST_MAC, "source MAC is the --net mac");
    assert_eq!(u16::from_be_bytes([frame[12], frame[13]]), ETHERTYPE);
    assert!(
        frame[14..].starts_with(GUEST_PAYLOAD),
        "payload {:?}",
        String::from_utf8_lossy(&frame[14..])
    );

    // Host -> guest: answer to the guest's MAC; the probe prints what it got.
    sock.send(GUEST_MAC, HOST_MAC, HOST_PAYLOAD.as_bytes())
        .expect("send to the guest");
    let out = vm.wait();
    let report = out.assert_clean_pass();
    let net = report.expect(&["net", "ok"]);
    assert_eq!(
        net.field("mac"),
        Some(format_mac(&GUEST_MAC).as_str()),
        "{}",
        out.describe()
    );
    assert_eq!(net.field_u64("sent"), Some(1), "{}", out.describe());
    assert_eq!(
        net.field("rx").map(|s| s.trim_end_matches('\0')),
        Some(HOST_PAYLOAD),
        "the guest did not get the host's frame\n{}",
        out.describe()
    );
}
