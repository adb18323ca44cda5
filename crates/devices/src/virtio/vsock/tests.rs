// Test data: hand-built guest-side values and small constants, narrowed on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::conn::CONN_BUF_ALLOC;
use super::packet::*;
use super::*;
use crate::virtio::chain::DESC_F_WRITE;
use crate::virtio::worker::testing::*;
use crate::GuestMem;

const GUEST_CID: u64 = 3;
const RX_BUFS: u64 = 0x40000;
const TX_BUFS: u64 = 0x60000;
const BUF_SIZE: u32 = 0x1000;

fn socket_path() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "pv-vsock-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

/// The test plays the guest driver on the device's queues.
struct Guest {
    dev: Vsock,
    mem: GuestMem,
    rxq: TestQueue,
    txq: TestQueue,
    kicks: Vec<EventFd>,
    irq: Arc<FakeInterrupt>,
    rx_seen: u16,
    tx_sent: u16,
}

impl Guest {
    fn new(path: &Path) -> Guest {
        Guest::new_on(Vsock::new(GUEST_CID, path).unwrap(), test_mem())
    }

    /// Activates `dev` on fresh rings in `mem`, with 16 rx buffers posted.
    fn new_on(mut dev: Vsock, mem: GuestMem) -> Guest {
        dev.ack_features(dev.device_features());
        mem.write_slice(&[0u8; 0x3000], GuestAddress(0x1000))
            .unwrap();
        let rxq = TestQueue::new(0x1000, 16);
        let txq = TestQueue::new(0x2000, 16);
        let evq = TestQueue::new(0x3000, 16);
        let irq = FakeInterrupt::new();
        let (queues, kicks) = active_queues(&[rxq, txq, evq]);
        // Post all rx buffers up front: buffer i is descriptor i.
        for i in 0..16u16 {
            rxq.add_chain(
                &mem,
                i,
                &[(
                    RX_BUFS + u64::from(i) * u64::from(BUF_SIZE),
                    BUF_SIZE,
                    DESC_F_WRITE,
                )],
            );
        }
        dev.activate(mem.clone(), irq.clone(), queues).unwrap();
        Guest {
            dev,
            mem,
            rxq,
            txq,
            kicks,
            irq,
            rx_seen: 0,
            tx_sent: 0,
        }
    }

    /// Waits for the next packet on rx, then recycles its buffer.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let (mem, rxq, seen) = (&self.mem, self.rxq, self.rx_seen);
        assert!(
            wait_until(|| rxq.used_idx(mem) != seen),
            "no rx packet arrived"
        );
        let (head, len) = self.rxq.used_elem(&self.mem, self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        assert!(len as usize >= HDR_LEN, "rx packet of {len} bytes");
        let mut buf = vec![0u8; len as usize];
        let addr = RX_BUFS + u64::from(head) * u64::from(BUF_SIZE);
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        let hdr = Header::from_bytes(buf[..HDR_LEN].try_into().unwrap());
        assert_eq!(hdr.len as usize, len as usize - HDR_LEN);
        self.rxq.publish(&self.mem, head as u16);
        self.kicks[0].write(1).unwrap();
        (hdr, buf[HDR_LEN..].to_vec())
    }

    /// Asserts that no rx packet arrives for a while.
    fn expect_silence(&self) {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            self.rxq.used_idx(&self.mem),
            self.rx_seen,
            "unexpected rx packet"
        );
    }

    /// Sends a raw packet on tx (header bytes + data in one descriptor) and waits for it.
    fn send_raw(&mut self, bytes: &[u8]) {
        let slot = self.tx_sent % 16;
        let addr = TX_BUFS + u64::from(slot) * u64::from(BUF_SIZE);
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.txq
            .add_chain(&self.mem, slot, &[(addr, bytes.len() as u32, 0)]);
        self.tx_sent = self.tx_sent.wrapping_add(1);
        self.kicks[1].write(1).unwrap();
        let (mem, txq, sent) = (&self.mem, self.txq, self.tx_sent);
        assert!(wait_until(|| txq.used_idx(mem) == sent), "tx not completed");
    }

    fn send(&mut self, hdr: Header, data: &[u8]) {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        self.send_raw(&bytes);
    }
}

/// A header from the guest's `port` to host `host_port`.
fn guest_hdr(op: u16, port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: port,
        dst_port: host_port,
        kind: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Header::default()
    }
}

fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while stream.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn read_exact(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

/// Host connects with CONNECT, the guest accepts; returns the host stream and the host port.
fn host_connect(g: &mut Guest, path: &Path, guest_port: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, guest_port);
    assert_eq!(req.kind, TYPE_STREAM);
    assert!(req.src_port >= 1024);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    g.send(guest_hdr(OP_RESPONSE, guest_port, req.src_port), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}", req.src_port));
    (host, req.src_port)
}

#[test]
fn host_initiated_round_trip() {
    let path = socket_path();
    let mut g = Guest::new(&path);
    let (mut host, hp) = host_connect(&mut g, &path, 1234);

    // Host -> guest.
    host.write_all(b"hello").unwrap();
    let (hdr, data) = g.recv();
    assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RW, hp, 1234));
    assert_eq!(data, b"hello");

    // Guest -> host.
    g.send(
        Header {
            len: 5,
            ..guest_hdr(OP_RW, 1234, hp)
        },
        b"world",
    );
    assert_eq!(read_exact(&mut host, 5), b"world");

    // A second host connection gets a different host port.
    let (_host2, hp2) = host_connect(&mut g, &path, 1234);
    assert_ne!(hp, hp2);

    // Host closes its side: the guest is told with SHUTDOWN(SEND).
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (hdr, _) = g.recv();
    assert_eq!(
        (hdr.op, hdr.flags, hdr.dst_port),
        (OP_SHUTDOWN, SHUTDOWN_SEND, 1234)
    );
    // The guest can still send until it shuts down completely, which resets the connection.
    g.send(
        Header {
            len: 3,
            ..guest_hdr(OP_RW, 1234, hp)
        },
        b"bye",
    );
    g.send(
        Header {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..guest_hdr(OP_SHUTDOWN, 1234, hp)
        },
        &[],
    );
    let (hdr, _) = g.recv();
    assert_eq!((hdr.op, hdr.src_port), (OP_RST, hp));
    assert_eq!(read_exact(&mut host, 3), b"bye");
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "host sees EOF");
    assert_eq!(g.irq.errors(), 0);
    assert!(g.irq.signals_for(0) > 0);
}

#[test]
fn guest_initiated_connection() {
    let path = socket_path();
    let mut g = Guest::new(&path);
    let service_path = PathBuf::from(format!("{}_5000", path.display()));
    let _ = std::fs::remove_file(&service_path);
    let service = UnixListener::bind(&service_path).unwrap();

    g.send(guest_hdr(OP_REQUEST, 777, 5000), &[]);
    let (hdr, _) = g.recv();
    assert_eq!(
        (hdr.op, hdr.src_port, hdr.dst_port),
        (OP_RESPONSE, 5000, 777)
    );
    let (mut peer, _) = service.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.send(
        Header {
            len: 4,
            ..guest_hdr(OP_RW, 777, 5000)
        },
        b"ping",
    );
    assert_eq!(read_exact(&mut peer, 4), b"ping");
    peer.write_all(b"pong").unwrap();
    let (hdr, data) = g.recv();
    assert_eq!((hdr.op, data.as_slice()), (OP_RW, &b"pong"[..]));

    // Guest RST closes the host stream.
    g.send(guest_hdr(OP_RST, 777, 5000), &[]);
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // A service whose backlog is full: RST, and the device does not stall.
    let busy_path = PathBuf::from(format!("{}_6000", path.display()));
    let _ = std::fs::remove_file(&busy_path);
    let busy = UnixListener::bind(&busy_path).unwrap();
    let mut clients = Vec::new();
    while let Ok(c) = super::muxer::connect_nonblocking(&busy_path) {
        clients.push(c);
        assert!(clients.len() < 100_000, "backlog never filled");
    }
    g.send(guest_hdr(OP_REQUEST, 779, 6000), &[]);
    let (hdr, _) = g.recv();
    assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RST, 6000, 779));
    drop((busy, clients));
    let _ = std::fs::remove_file(&busy_path);

    // Nobody listens on port 5001: RST.
    g.send(guest_hdr(OP_REQUEST, 778, 5001), &[]);
    let (hdr, _) = g.recv();
    assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RST, 5001, 778));
    drop(g);
    let _ = std::fs::remove_file(&service_path);
}

#[test]
fn hostile_packets_are_dropped_or_reset() {
    let path = socket_path();
    let mut g = Guest::new(&path);
    // Wrong source CID, wrong destination CID: dropped silently.
    g.send(
        Header {
            src_cid: 7,
            ..guest_hdr(OP_REQUEST, 1, 2)
        },
        &[],
    );
    g.send(
        Header {
            dst_cid: 9,
            ..guest_hdr(OP_REQUEST, 1, 2)
        },
        &[],
    );
    // Length larger than the buffer: dropped.
    g.send(
        Header {
            len: 1000,
            ..guest_hdr(OP_RW, 1, 2)
        },
        b"short",
    );
    // Shorter than a header: dropped.
    g.send_raw(&[1, 2, 3]);
    g.expect_silence();
    // Not a stream: RST. Data on an unknown connection: RST. RST on unknown: nothing.
    g.send(
        Header {
            kind: 2,
            ..guest_hdr(OP_REQUEST, 10, 20)
        },
        &[],
    );
    assert_eq!(g.recv().0.op, OP_RST);
    g.send(
        Header {
            len: 2,
            ..guest_hdr(OP_RW, 11, 21)
        },
        b"hi",
    );
    let (hdr, _) = g.recv();
    assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RST, 21, 11));
    g.send(guest_hdr(OP_RST, 12, 22), &[]);
    g.expect_silence();

    // A bogus CONNECT line from the host is refused without bothering the guest.
    let mut host = UnixStream::connect(&path).unwrap();
    host.write_all(b"HELLO 1\n").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    g.expect_silence();

    // A RESPONSE for a connection nobody requested: RST.
    g.send(guest_hdr(OP_RESPONSE, 13, 23), &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    assert_eq!(g.irq.errors(), 0);
}

#[test]
fn credit_limits_host_to_guest_data() {
    let path = socket_path();
    let mut g = Guest::new(&path);
    let mut host = UnixStream::connect(&path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = g.recv();
    // The guest only has 8 bytes of buffer.
    g.send(
        Header {
            buf_alloc: 8,
            ..guest_hdr(OP_RESPONSE, 99, req.src_port)
        },
        &[],
    );
    assert_eq!(read_line(&mut host), format!("OK {}", req.src_port));
    host.write_all(&[7u8; 20]).unwrap();
    let (hdr, data) = g.recv();
    assert_eq!((hdr.op, data.len()), (OP_RW, 8));
    // Out of credit: the device asks for more instead of sending.
    let (hdr, _) = g.recv();
    assert_eq!(hdr.op, OP_CREDIT_REQUEST);
    g.expect_silence();
    // The guest consumed the 8 bytes and grants 8 more.
    g.send(
        Header {
            buf_alloc: 8,
            fwd_cnt: 8,
            ..guest_hdr(OP_CREDIT_UPDATE, 99, req.src_port)
        },
        &[],
    );
    let (hdr, data) = g.recv();
    assert_eq!((hdr.op, data.len()), (OP_RW, 8));
    assert_eq!(g.recv().0.op, OP_CREDIT_REQUEST);
    // A guest credit request (with unchanged credit) is answered with our counters.
    g.send(
        Header {
            buf_alloc: 8,
            fwd_cnt: 8,
            ..guest_hdr(OP_CREDIT_REQUEST, 99, req.src_port)
        },
        &[],
    );
    let (hdr, _) = g.recv();
    assert_eq!((hdr.op, hdr.buf_alloc), (OP_CREDIT_UPDATE, CONN_BUF_ALLOC));
    g.expect_silence();
    // The last 4 bytes follow the next credit.
    g.send(
        Header {
            buf_alloc: 8,
            fwd_cnt: 16,
            ..guest_hdr(OP_CREDIT_UPDATE, 99, req.src_port)
        },
        &[],
    );
    let (hdr, data) = g.recv();
    assert_eq!((hdr.op, data), (OP_RW, vec![7u8; 4]));
    assert_eq!(g.irq.errors(), 0);
}

#[test]
fn reset_closes_connections_and_reactivates() {
    let path = socket_path();
    let mut g = Guest::new(&path);
    let (mut host, _) = host_connect(&mut g, &path, 42);
    g.dev.reset();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "reset closed the host stream");
    // The listener survives: a new activation serves new connections.
    let mem = g.mem.clone();
    let dev = std::mem::replace(&mut g.dev, Vsock::new(9, &socket_path()).unwrap());
    let mut g2 = Guest::new_on(dev, mem);
    let (_host, _) = host_connect(&mut g2, &path, 43);
}

#[test]
fn constructor_and_config() {
    let path = socket_path();
    std::fs::write(&path, b"stale").unwrap();
    let dev = Vsock::new(0x2345_6789, &path).unwrap();
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0x2345_6789);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert!(matches!(
        Vsock::new(2, &socket_path()),
        Err(VsockError::BadCid(2))
    ));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), &socket_path()),
        Err(VsockError::BadCid(_))
    ));
    assert!(matches!(
        Vsock::new(3, Path::new("/nonexistent/dir/sock")),
        Err(VsockError::Listen { .. })
    ));
}

#[test]
fn guest_is_told_about_freed_buffer_space() {
    let path = socket_path();
    let mut g = Guest::new(&path);
    let (mut host, hp) = host_connect(&mut g, &path, 7);
    let chunk = vec![0x5Au8; 4000];
    for _ in 0..17 {
        g.send(
            Header {
                len: 4000,
                ..guest_hdr(OP_RW, 7, hp)
            },
            &chunk,
        );
    }
    // 68000 bytes forwarded > a quarter of our buffer: a credit update reports them.
    let (hdr, _) = g.recv();
    assert_eq!(hdr.op, OP_CREDIT_UPDATE);
    assert!(hdr.fwd_cnt >= CONN_BUF_ALLOC / 4, "fwd_cnt {}", hdr.fwd_cnt);
    assert_eq!(read_exact(&mut host, 68000), vec![0x5A; 68000]);
}

/// Random packets from a hostile guest never panic, break the queues or stall the device.
#[test]
fn fuzz_random_packets() {
    let path = socket_path();
    let mut g = Guest::new(&path);
    let service_path = PathBuf::from(format!("{}_80", path.display()));
    let _ = std::fs::remove_file(&service_path);
    let service = UnixListener::bind(&service_path).unwrap();
    service.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
    for _ in 0..1500 {
        let hdr = Header {
            src_cid: [GUEST_CID, GUEST_CID, GUEST_CID, 2, rng.next()][rng.below(5) as usize],
            dst_cid: [HOST_CID, HOST_CID, HOST_CID, GUEST_CID, rng.next()][rng.below(5) as usize],
            src_port: rng.below(4) as u32,
            dst_port: [80, 81, 1024, rng.next() as u32][rng.below(4) as usize],
            len: [0, 1, 100, 4000, 5000, rng.next() as u32][rng.below(6) as usize],
            kind: [TYPE_STREAM, TYPE_STREAM, 2, rng.next() as u16][rng.below(4) as usize],
            op: rng.below(9) as u16,
            flags: rng.below(4) as u32,
            buf_alloc: [0, 8, 65536, rng.next() as u32][rng.below(4) as usize],
            fwd_cnt: [0, 8, rng.next() as u32][rng.below(3) as usize],
        };
        let data = vec![rng.next() as u8; rng.below(200) as usize];
        if rng.below(10) == 0 {
            let mut bytes = hdr.to_bytes().to_vec();
            bytes.truncate(rng.below(HDR_LEN as u64) as usize);
            g.send_raw(&bytes);
        } else {
            g.send(hdr, &data);
        }
        // Keep the rx side moving and the service side accepting.
        while g.rxq.used_idx(&g.mem) != g.rx_seen {
            g.recv();
        }
        if let Ok((s, _)) = service.accept() {
            s.set_nonblocking(true).unwrap();
            accepted.push(s);
        }
        for s in &mut accepted {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
        }
    }
    assert_eq!(g.irq.errors(), 0);
    // The device still works: a host connection completes its handshake.
    std::thread::sleep(Duration::from_millis(100));
    while g.rxq.used_idx(&g.mem) != g.rx_seen {
        g.recv();
    }
    let (_host, _) = host_connect(&mut g, &path, 4321);
    drop(g);
    let _ = std::fs::remove_file(&service_path);
}

#[test]
fn restored_device_tells_the_driver_its_connections_are_gone() {
    let path = socket_path();
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    dev.restored();
    let g = Guest::new_on(dev, test_mem());
    let evq = TestQueue::new(0x3000, 16);
    let buf = 0x9_0000;
    g.mem.write_slice(&[0xffu8; 8], GuestAddress(buf)).unwrap();
    // The event buffer comes after activation; the reset waits for it.
    evq.add_chain(&g.mem, 0, &[(buf, 8, DESC_F_WRITE)]);
    g.kicks[2].write(1).unwrap();
    assert!(wait_until(|| evq.used_idx(&g.mem) == 1), "no event");
    assert_eq!(evq.used_elem(&g.mem, 0), (0, 4));
    let mut id = [0u8; 8];
    g.mem.read_slice(&mut id, GuestAddress(buf)).unwrap();
    assert_eq!(id, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    // Only once.
    evq.add_chain(&g.mem, 1, &[(buf, 8, DESC_F_WRITE)]);
    g.kicks[2].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(evq.used_idx(&g.mem), 1);
}
