//! virtio-net driver and the `net` selftest part: one broadcast frame out (ethertype
//! 0x88B5), then wait for a frame with the same ethertype.

use super::pci::VirtioPci;
use super::queue::{Buf, Queue, Wait};
use crate::port::mmio;
use crate::{fail, mem, probe, pvh, time};

/// Virtio type of network devices.
pub const TYPE: u16 = 1;
/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// The probe's ethertype (IEEE local experimental).
pub const ETHERTYPE: u16 = 0x88B5;
/// Payload of the probe's frame.
pub const PAYLOAD: &[u8] = b"pocketvisor-probe-net";

const HDR: u64 = 12; // virtio_net_hdr (with num_buffers), always for VERSION_1
const RX_BUF: u64 = 2048;
const RX_BUF_U32: u32 = 2048;
const HDR_LEN: usize = 12;
const RX_COUNT: u16 = 16;

/// An initialised network device.
pub struct Net {
    /// Kept with its queues for the device's lifetime.
    _dev: VirtioPci,
    rx: Queue,
    tx: Queue,
    rx_bufs: u64,
    /// Receive buffer slot of each descriptor head.
    rx_slot_of_head: [u8; 256],
    tx_buf: u64,
    /// The device MAC (zero when the device has none).
    pub mac: [u8; 6],
}

impl Net {
    /// Finds and initialises the first network device, posting the receive buffers.
    pub fn open() -> Result<Option<Net>, &'static str> {
        let Some(f) = super::pci::find(TYPE, 0) else {
            return Ok(None);
        };
        let mut dev = VirtioPci::new(&f)?;
        let feats = dev.begin_init(F_MAC)?;
        let mut rx = dev.setup_queue(0, RX_COUNT)?;
        let tx = dev.setup_queue(1, 16)?;
        let rx_bufs = mem::alloc(RX_BUF * rx.size as u64, 4096);
        let mut rx_slot_of_head = [0u8; 256];
        for slot in 0..u8::try_from(rx.size).unwrap_or(u8::MAX) {
            let addr = rx_bufs + slot as u64 * RX_BUF;
            let head = rx
                .push(&[Buf {
                    addr,
                    len: RX_BUF_U32,
                    write: true,
                }])
                .ok_or("rx-post")?;
            rx_slot_of_head[head as usize % 256] = slot;
        }
        dev.driver_ok();
        rx.kick();
        let mut mac = [0u8; 6];
        if feats & F_MAC != 0 {
            for (i, m) in mac.iter_mut().enumerate() {
                *m = dev.config::<u8>(i as u64);
            }
        }
        Ok(Some(Net {
            _dev: dev,
            rx,
            tx,
            rx_bufs,
            rx_slot_of_head,
            tx_buf: mem::alloc(4096, 4096),
            mac,
        }))
    }

    /// Sends one Ethernet frame (without virtio header) and waits for completion.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), &'static str> {
        let b = mem::bytes(self.tx_buf, 4096);
        b[..HDR_LEN].fill(0);
        let n = frame.len().min(4096 - HDR_LEN);
        b[HDR_LEN..HDR_LEN + n].copy_from_slice(&frame[..n]);
        let len = crate::bits::lo32(HDR + n as u64); // n <= 4096 - HDR
        self.tx
            .push(&[Buf {
                addr: self.tx_buf,
                len,
                write: false,
            }])
            .ok_or("tx-full")?;
        self.tx.kick();
        if self.tx.wait_used(2000) == Wait::Timeout {
            return Err("tx-timeout");
        }
        self.tx.pop_used().ok_or("tx-no-used")?;
        Ok(())
    }

    /// Waits up to `ms` for a frame with `ethertype`; copies its payload into `out`.
    pub fn recv(&mut self, ethertype: u16, ms: u64, out: &mut [u8]) -> Option<usize> {
        self.recv_where(|et| et == ethertype, ms, out)
            .map(|(_, n)| n)
    }

    /// Waits up to `ms` for a frame whose ethertype `wanted` accepts; copies its payload into
    /// `out` and returns the ethertype and the payload's length.
    pub fn recv_where(
        &mut self,
        wanted: impl Fn(u16) -> bool,
        ms: u64,
        out: &mut [u8],
    ) -> Option<(u16, usize)> {
        let dl = time::deadline_ms(ms);
        loop {
            while let Some((id, len)) = self.rx.pop_used() {
                let slot = self.rx_slot_of_head[id as usize % 256];
                let addr = self.rx_bufs + slot as u64 * RX_BUF;
                let len = (len as u64).min(RX_BUF);
                let mut got = None;
                if len >= HDR + 14 {
                    let f = addr + HDR;
                    let et =
                        u16::from_be_bytes([mmio::read::<u8>(f + 12), mmio::read::<u8>(f + 13)]);
                    if wanted(et) {
                        let plen = crate::bits::usize_from(len - HDR - 14).min(out.len());
                        out[..plen].copy_from_slice(&mem::bytes(f + 14, plen)[..plen]);
                        got = Some((et, plen));
                    }
                }
                // Re-post the buffer.
                if let Some(head) = self.rx.push(&[Buf {
                    addr,
                    len: RX_BUF_U32,
                    write: true,
                }]) {
                    self.rx_slot_of_head[head as usize % 256] = slot;
                }
                self.rx.kick();
                if got.is_some() {
                    return got;
                }
            }
            let left = dl.saturating_sub(crate::port::rdtsc()) / time::tsc_khz();
            if left == 0 || self.rx.wait_used(left) == Wait::Timeout {
                return None;
            }
        }
    }

    /// How completions were noticed on rx and tx.
    pub fn irq_report(&self) {
        probe!(
            "net irq={} hits={} polled={} rx_irq={} rx_hits={}",
            self.tx.irq_mode(),
            self.tx.irq_hits,
            self.tx.polled,
            self.rx.irq_mode(),
            self.rx.irq_hits
        );
    }
}

/// The `net` selftest part.
pub fn selftest() {
    let mut net = match Net::open() {
        Ok(Some(n)) => n,
        Ok(None) => return probe!("net skip no-device"),
        Err(e) => return fail("net", format_args!("init {e}")),
    };
    let mut frame = [0u8; 60];
    frame[..6].fill(0xFF);
    frame[6..12].copy_from_slice(&net.mac);
    frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    frame[14..14 + PAYLOAD.len()].copy_from_slice(PAYLOAD);
    if let Err(e) = net.send(&frame) {
        return fail("net", format_args!("{e}"));
    }
    let wait = pvh::info().arg_u64("pv.net.wait", 3000);
    let mut payload = [0u8; 1500];
    let rx = net.recv(ETHERTYPE, wait, &mut payload);
    let m = net.mac;
    let mac_args = format_args!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    );
    match rx {
        Some(n) => {
            let text = printable(&payload[..n]);
            probe!("net ok mac={} sent=1 rx=\"{}\"", mac_args, text)
        }
        None => probe!("net ok mac={} sent=1 rx=none", mac_args),
    }
    send_given_frames(&mut net);
    net.irq_report();
}

/// `pv.net.frames=HEX,HEX,...`: sends each whole Ethernet frame as given (the tests build
/// IPv4, IPv6 and ARP frames on the host), then for `pv.net.listen` ms (default 0) prints the
/// IPv4 and IPv6 frames that arrive (`net rx-ip "<payload, non-printable bytes as ?>"`).
/// An item `rx` instead of a frame waits up to 10 s for one IPv4 or IPv6 frame (printed the
/// same way, or `net rx-ip none`) before the next is sent: a request, its answer, then what
/// depends on the answer.
fn send_given_frames(net: &mut Net) {
    let info = pvh::info();
    let Some(list) = info.arg("pv.net.frames") else {
        return;
    };
    let mut frame = [0u8; 1514];
    let mut last = 0usize;
    let mut sent = 0u32;
    for (i, hex) in list.split(',').enumerate() {
        if hex == "rx" {
            let mut payload = [0u8; 1500];
            match net.recv_where(|et| et == 0x0800 || et == 0x86DD, 10_000, &mut payload) {
                Some((_, n)) => probe!("net rx-ip \"{}\"", printable_all(&payload[..n])),
                None => probe!("net rx-ip none"),
            }
            continue;
        }
        let Some(n) = decode_hex(hex, &mut frame) else {
            return fail(
                "net",
                format_args!("frame {i} is not hex of at most 1514 bytes"),
            );
        };
        if let Err(e) = net.send(&frame[..n]) {
            return fail("net", format_args!("frame {i}: {e}"));
        }
        last = n;
        sent += 1;
    }
    probe!("net frames sent={}", sent);
    flood(net, &frame[..last]);
    let dl = time::deadline_ms(info.arg_u64("pv.net.listen", 0));
    let mut payload = [0u8; 1500];
    loop {
        let left = dl.saturating_sub(crate::port::rdtsc()) / time::tsc_khz();
        if left == 0 {
            break;
        }
        if let Some((_, n)) = net.recv_where(|et| et == 0x0800 || et == 0x86DD, left, &mut payload)
        {
            probe!("net rx-ip \"{}\"", printable_all(&payload[..n]));
        }
    }
    probe!("net frames done");
}

/// `pv.net.flood=MS`: sends `frame` (the last one `pv.net.frames` gave) again and again for
/// MS ms, a whole transmit queue of copies (each in its own buffer) per notification, polling
/// until all of them are used before the next burst, and prints `net flood frames=N bytes=B us=T` (the
/// bench of the VMM's network policy). With `pv.net.flood.ports=K` (K > 1) the UDP or TCP
/// destination port of an IPv4 frame goes up by one each frame, K ports round, so each frame
/// may be a new flow for the policy.
fn flood(net: &mut Net, frame: &[u8]) {
    let info = pvh::info();
    let ms = info.arg_u64("pv.net.flood", 0);
    if ms == 0 || frame.len() < 38 || frame.len() > 4096 - HDR_LEN {
        return;
    }
    let ports = info.arg_u64("pv.net.flood.ports", 1).max(1);
    let base = u64::from(u16::from_be_bytes([frame[36], frame[37]]));
    let ipv4 = frame[12..14] == [0x08, 0x00] && frame[14] == 0x45;
    let burst = net.tx.size;
    let area = mem::alloc(4096 * u64::from(burst), 4096);
    // At most 4096 bytes (checked above).
    let len = crate::bits::lo32(HDR + frame.len() as u64);
    // Every buffer holds the frame from the start; a burst only rewrites the ports.
    for i in 0..burst {
        let b = mem::bytes(area + 4096 * u64::from(i), 4096);
        b[..HDR_LEN].fill(0);
        b[HDR_LEN..HDR_LEN + frame.len()].copy_from_slice(frame);
    }
    let t0 = crate::port::rdtsc();
    let dl = time::deadline_ms(ms);
    let (mut frames, mut bytes) = (0u64, 0u64);
    while !time::expired(dl) {
        for i in 0..burst {
            let addr = area + 4096 * u64::from(i);
            if ipv4 && ports > 1 {
                let n = frames + u64::from(i);
                let port = crate::bits::lo16(crate::bits::lo32((base + n % ports) & 0xffff));
                let b = mem::bytes(addr, 4096);
                b[HDR_LEN + 36..HDR_LEN + 38].copy_from_slice(&port.to_be_bytes());
            }
            if net
                .tx
                .push(&[Buf {
                    addr,
                    len,
                    write: false,
                }])
                .is_none()
            {
                return fail("net", format_args!("flood tx-full at frame {frames}"));
            }
        }
        net.tx.kick();
        // Polled, as a busy driver does (NAPI): the burst's completions, not an interrupt's
        // latency, are what this measures.
        let (mut done, wait) = (0u16, time::deadline_ms(2000));
        while done < burst {
            while net.tx.pop_used().is_some() {
                done += 1;
            }
            if time::expired(wait) {
                return fail("net", format_args!("flood tx-timeout at frame {frames}"));
            }
            core::hint::spin_loop();
        }
        frames += u64::from(burst);
        bytes += u64::from(burst) * frame.len() as u64;
    }
    let us = time::tsc_to_us(crate::port::rdtsc() - t0);
    probe!("net flood frames={} bytes={} us={}", frames, bytes, us);
}

/// Hex digits into `out`; None if not hex or too long.
fn decode_hex(hex: &str, out: &mut [u8]) -> Option<usize> {
    let b = hex.as_bytes();
    if !b.len().is_multiple_of(2) || b.len() / 2 > out.len() {
        return None;
    }
    let digit = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    for (o, pair) in out.iter_mut().zip(b.chunks(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(b.len() / 2)
}

/// Like [`printable`], without stopping at a NUL (binary headers come first).
fn printable_all(b: &[u8]) -> Printable {
    let mut p = Printable {
        buf: [0; 256],
        len: b.len().min(256),
    };
    for (o, &c) in p.buf.iter_mut().zip(b) {
        *o = if (0x20..0x7F).contains(&c) && c != b'"' {
            c
        } else {
            b'?'
        };
    }
    p
}

/// The printable ASCII prefix of `b` up to the first NUL, at most 256 bytes; other
/// bytes (and `"`) become '?'.
fn printable(b: &[u8]) -> Printable {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len()).min(256);
    let mut p = Printable {
        buf: [0; 256],
        len: end,
    };
    for (o, &c) in p.buf.iter_mut().zip(&b[..end]) {
        *o = if (0x20..0x7F).contains(&c) && c != b'"' {
            c
        } else {
            b'?'
        };
    }
    p
}

struct Printable {
    buf: [u8; 256],
    len: usize,
}

impl core::fmt::Display for Printable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?"))
    }
}

/// The first network device's MAC, watched without initialising the device (its config is
/// readable before): a clone's cloud host gives the guest a new one, which this guest
/// notices (a driver reads it only at its probe; nothing tells it).
pub struct MacWatch {
    dev: VirtioPci,
    mac: [u8; 6],
}

impl MacWatch {
    /// Watches the first network device, if there is one.
    pub fn open() -> Option<MacWatch> {
        let f = super::pci::find(TYPE, 0)?;
        let dev = VirtioPci::new(&f).ok()?;
        let mac = Self::read(&dev);
        Some(MacWatch { dev, mac })
    }

    fn read(dev: &VirtioPci) -> [u8; 6] {
        let mut mac = [0u8; 6];
        dev.config_bytes(0, &mut mac);
        mac
    }

    /// Prints `PROBE twin mac=aa:bb:cc:dd:ee:ff` when the MAC changed since the last look.
    pub fn check(&mut self) {
        let m = Self::read(&self.dev);
        if m != self.mac {
            probe!(
                "twin mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0],
                m[1],
                m[2],
                m[3],
                m[4],
                m[5]
            );
            self.mac = m;
        }
    }
}
