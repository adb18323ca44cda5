//! virtio-vsock driver and the `vsock` selftest part: listen on `pv.vsock.port`, accept
//! connections (up to [`MAX_CONNS`] at once, any number in sequence), echo every byte
//! back with credit-based flow control, stop after `pv.vsock.wait` ms without one.

use super::pci::VirtioPci;
use super::queue::{Buf, Queue, Wait};
use crate::port::mmio;
use crate::{fail, mem, probe, pvh, time};

/// Virtio type of socket devices.
pub const TYPE: u16 = 19;

const HDR_LEN: u32 = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_SEND: u32 = 2;

/// Our receive buffer per connection (advertised as buf_alloc).
const BUF_ALLOC: u32 = 64 * 1024;
/// Connections served at the same time.
pub const MAX_CONNS: usize = 4;
const RX_SLOT: u64 = 8192; // header at +0, data (4 KiB) at +4096
const RX_DATA: u32 = 4096;
/// Idle time after which an established connection is dropped.
const CONN_IDLE_MS: u64 = 15_000;

/// A byte-stream service run on the listener instead of the echo (see [`Vsock::serve_service`]).
pub trait Service {
    /// Connection slot `conn` (0..[`MAX_CONNS`]) was accepted: forget its old state.
    fn opened(&mut self, conn: usize);
    /// `data` arrived on `conn`; `false` resets the connection.
    fn received(&mut self, conn: usize, data: &[u8]) -> bool;
    /// Copies up to `out.len()` bytes of pending output for `conn` into `out`; returns the count.
    fn take_output(&mut self, conn: usize, out: &mut [u8]) -> usize;
}

/// A decoded packet header.
#[derive(Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    typ: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn read(a: u64) -> Hdr {
        Hdr {
            src_cid: mmio::read::<u64>(a),
            dst_cid: mmio::read::<u64>(a + 8),
            src_port: mmio::read::<u32>(a + 16),
            dst_port: mmio::read::<u32>(a + 20),
            len: mmio::read::<u32>(a + 24),
            typ: mmio::read::<u16>(a + 28),
            op: mmio::read::<u16>(a + 30),
            flags: mmio::read::<u32>(a + 32),
            buf_alloc: mmio::read::<u32>(a + 36),
            fwd_cnt: mmio::read::<u32>(a + 40),
        }
    }

    fn write(&self, a: u64) {
        mmio::write::<u64>(a, self.src_cid);
        mmio::write::<u64>(a + 8, self.dst_cid);
        mmio::write::<u32>(a + 16, self.src_port);
        mmio::write::<u32>(a + 20, self.dst_port);
        mmio::write::<u32>(a + 24, self.len);
        mmio::write::<u16>(a + 28, self.typ);
        mmio::write::<u16>(a + 30, self.op);
        mmio::write::<u32>(a + 32, self.flags);
        mmio::write::<u32>(a + 36, self.buf_alloc);
        mmio::write::<u32>(a + 40, self.fwd_cnt);
    }
}

/// One accepted stream connection with its echo backlog.
struct Conn {
    peer_cid: u64,
    peer_port: u32,
    local_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent (RW payload).
    tx_cnt: u32,
    /// Bytes we received and passed on (echoed): advertised as fwd_cnt.
    fwd_cnt: u32,
    /// Echo backlog: a ring of BUF_ALLOC bytes.
    ring: u64,
    head: u32,
    len: u32,
    peer_done: bool,
    /// A CREDIT_REQUEST is outstanding (sent while the peer's credit was 0).
    credit_requested: bool,
    last_activity: u64,
}

impl Conn {
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The vsock device and the listener state.
pub struct Vsock {
    dev: VirtioPci,
    rx: Queue,
    tx: Queue,
    ev: Queue,
    /// Guest CID from the device config.
    pub cid: u64,
    rx_base: u64,
    rx_slot_of_head: [u8; 256],
    ev_buf: u64,
    tx_buf: u64,
    conns: [Option<Conn>; MAX_CONNS],
    rings: [u64; MAX_CONNS],
    /// Connections that completed (closed after being established).
    pub finished: u32,
    /// Total bytes echoed.
    pub echoed: u64,
    /// Packets sent / received, TSC ticks spent waiting for tx completions.
    stats: [u64; 3],
    /// Last time a connection opened or closed.
    last_event: u64,
}

impl Vsock {
    /// Finds and initialises the first vsock device.
    pub fn open() -> Result<Option<Vsock>, &'static str> {
        let Some(f) = super::pci::find(TYPE, 0) else {
            return Ok(None);
        };
        let mut dev = VirtioPci::new(&f)?;
        dev.begin_init(0)?;
        let rx = dev.setup_queue(0, 64)?;
        let tx = dev.setup_queue(1, 64)?;
        let ev = dev.setup_queue(2, 8)?;
        let cid = dev.config::<u32>(0) as u64 | (dev.config::<u32>(4) as u64) << 32;
        let n_rx = (rx.size / 2) as u64;
        let mut v = Vsock {
            rx_base: mem::alloc(RX_SLOT * n_rx, 4096),
            ev_buf: mem::alloc(4096, 4096),
            tx_buf: mem::alloc(8192, 4096),
            rings: [0; MAX_CONNS],
            dev,
            rx,
            tx,
            ev,
            cid,
            rx_slot_of_head: [0; 256],
            conns: [const { None }; MAX_CONNS],
            finished: 0,
            echoed: 0,
            stats: [0; 3],
            last_event: 0,
        };
        for r in v.rings.iter_mut() {
            *r = mem::alloc(BUF_ALLOC as u64, 4096);
        }
        for slot in 0..u8::try_from(n_rx).unwrap_or(u8::MAX) {
            v.post_rx(slot)?;
        }
        for i in 0..v.ev.size.min(8) as u64 {
            v.ev.push(&[Buf {
                addr: v.ev_buf + 16 * i,
                len: 8,
                write: true,
            }])
            .ok_or("ev-post")?;
        }
        v.dev.driver_ok();
        v.rx.kick();
        v.ev.kick();
        Ok(Some(v))
    }

    fn post_rx(&mut self, slot: u8) -> Result<(), &'static str> {
        let a = self.rx_base + slot as u64 * RX_SLOT;
        let head = self
            .rx
            .push(&[
                Buf {
                    addr: a,
                    len: HDR_LEN,
                    write: true,
                },
                Buf {
                    addr: a + 4096,
                    len: RX_DATA,
                    write: true,
                },
            ])
            .ok_or("rx-post")?;
        if let Some(s) = self.rx_slot_of_head.get_mut(head as usize) {
            *s = slot;
        }
        Ok(())
    }

    /// Sends one packet (header fields from `h`, payload `data` at a probe address).
    fn send(&mut self, h: &Hdr, data: Option<(u64, u32)>) -> Result<(), &'static str> {
        h.write(self.tx_buf);
        let hb = Buf {
            addr: self.tx_buf,
            len: HDR_LEN,
            write: false,
        };
        match data {
            Some((addr, len)) if len > 0 => self
                .tx
                .push(&[
                    hb,
                    Buf {
                        addr,
                        len,
                        write: false,
                    },
                ])
                .ok_or("tx-full")?,
            _ => self.tx.push(&[hb]).ok_or("tx-full")?,
        };
        self.tx.kick();
        self.stats[0] += 1;
        let t0 = crate::port::rdtsc();
        let w = self.tx.wait_used(2000);
        self.stats[2] += crate::port::rdtsc() - t0;
        if w == Wait::Timeout {
            return Err("tx-timeout");
        }
        while self.tx.pop_used().is_some() {}
        Ok(())
    }

    fn reply(&mut self, to: &Hdr, op: u16, flags: u32, fwd_cnt: u32) -> Result<(), &'static str> {
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: to.src_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            typ: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        };
        self.send(&h, None)
    }

    fn find(&self, h: &Hdr) -> Option<usize> {
        self.conns.iter().position(|c| {
            c.as_ref().is_some_and(|c| {
                c.peer_cid == h.src_cid && c.peer_port == h.src_port && c.local_port == h.dst_port
            })
        })
    }

    fn close(&mut self, i: usize, send_rst: bool) -> Result<(), &'static str> {
        if let Some(c) = self.conns.get_mut(i).and_then(Option::take) {
            if send_rst {
                let h = Hdr {
                    src_cid: c.peer_cid,
                    dst_cid: self.cid,
                    src_port: c.peer_port,
                    dst_port: c.local_port,
                    ..Hdr::default()
                };
                self.reply(&h, OP_RST, 0, c.fwd_cnt)?;
            }
            self.finished += 1;
            self.last_event = time::now_ms();
        }
        Ok(())
    }

    /// Handles one received packet.
    fn handle<'s>(
        &mut self,
        h: &Hdr,
        data: u64,
        port: u32,
        svc: Option<&mut (dyn Service + 's)>,
    ) -> Result<(), &'static str> {
        if h.typ != TYPE_STREAM || h.dst_cid != self.cid {
            return if h.op != OP_RST {
                self.reply(h, OP_RST, 0, 0)
            } else {
                Ok(())
            };
        }
        let idx = self.find(h);
        if let Some(c) = idx.and_then(|i| self.conns[i].as_mut()) {
            if c.peer_fwd_cnt != h.fwd_cnt || c.peer_buf_alloc != h.buf_alloc {
                c.credit_requested = false;
            }
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            c.last_activity = time::now_ms();
        }
        match (h.op, idx) {
            (OP_REQUEST, None) => {
                let free = self.conns.iter().position(Option::is_none);
                match free {
                    Some(i) if h.dst_port == port => {
                        self.conns[i] = Some(Conn {
                            peer_cid: h.src_cid,
                            peer_port: h.src_port,
                            local_port: h.dst_port,
                            peer_buf_alloc: h.buf_alloc,
                            peer_fwd_cnt: h.fwd_cnt,
                            tx_cnt: 0,
                            fwd_cnt: 0,
                            ring: self.rings[i],
                            head: 0,
                            len: 0,
                            peer_done: false,
                            credit_requested: false,
                            last_activity: time::now_ms(),
                        });
                        self.last_event = time::now_ms();
                        if let Some(s) = svc {
                            s.opened(i);
                        }
                        self.reply(h, OP_RESPONSE, 0, 0)
                    }
                    _ => self.reply(h, OP_RST, 0, 0),
                }
            }
            (OP_RW, Some(i)) => {
                let Some(c) = self.conns[i].as_mut() else {
                    return Ok(());
                };
                let n = h.len.min(RX_DATA);
                if let Some(s) = svc {
                    // Consumed at once: the credit returns now (told every 16 KiB).
                    let ok = s.received(i, mem::bytes(data, n as usize));
                    let before = c.fwd_cnt;
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
                    let fwd = c.fwd_cnt;
                    if !ok {
                        return self.close(i, true);
                    }
                    if before / 16384 != fwd / 16384 {
                        return self.reply(h, OP_CREDIT_UPDATE, 0, fwd);
                    }
                    return Ok(());
                }
                if c.len + n > BUF_ALLOC {
                    // The peer ignored our credit: drop the connection.
                    return self.close(i, true);
                }
                // Append to the ring in at most two contiguous pieces.
                let tail = (c.head + c.len) % BUF_ALLOC;
                let first = n.min(BUF_ALLOC - tail);
                mem::copy(data, c.ring + tail as u64, first as usize);
                mem::copy(data + first as u64, c.ring, (n - first) as usize);
                c.len += n;
                Ok(())
            }
            (OP_CREDIT_REQUEST, Some(i)) => {
                let fwd = self.conns[i].as_ref().map_or(0, |c| c.fwd_cnt);
                self.reply(h, OP_CREDIT_UPDATE, 0, fwd)
            }
            (OP_CREDIT_UPDATE, Some(_)) => Ok(()),
            (OP_SHUTDOWN, Some(i)) => {
                if let Some(c) = self.conns[i].as_mut() {
                    c.peer_done = true;
                }
                if h.flags & SHUTDOWN_SEND == 0 {
                    // Only the receive side closed: nothing more will be read, stop.
                    if let Some(c) = self.conns[i].as_mut() {
                        c.len = 0;
                    }
                }
                Ok(())
            }
            (OP_RST, Some(i)) => self.close(i, false),
            (OP_RST, None) => Ok(()),
            (_, None) => self.reply(h, OP_RST, 0, 0),
            _ => Ok(()),
        }
    }

    /// Sends as much of each connection's backlog as the peer's credit allows, and
    /// closes connections whose peer shut down once their backlog is empty.
    fn flush<'s>(&mut self, mut svc: Option<&mut (dyn Service + 's)>) -> Result<(), &'static str> {
        let echo = svc.is_none();
        for i in 0..MAX_CONNS {
            loop {
                // A service's output is pulled into the (empty) ring as it drains.
                if let (Some(s), Some(c)) = (svc.as_deref_mut(), self.conns[i].as_mut()) {
                    if c.len == 0 {
                        c.head = 0;
                        let n = s.take_output(i, mem::bytes(c.ring, BUF_ALLOC as usize));
                        c.len = u32::try_from(n).unwrap_or(u32::MAX).min(BUF_ALLOC);
                    }
                }
                let Some(c) = self.conns[i].as_ref() else {
                    break;
                };
                let contiguous = (BUF_ALLOC - c.head).min(c.len);
                let n = contiguous.min(c.peer_credit()).min(4096);
                if n == 0 {
                    break;
                }
                let h = Hdr {
                    src_cid: self.cid,
                    dst_cid: c.peer_cid,
                    src_port: c.local_port,
                    dst_port: c.peer_port,
                    len: n,
                    typ: TYPE_STREAM,
                    op: OP_RW,
                    flags: 0,
                    buf_alloc: BUF_ALLOC,
                    fwd_cnt: c.fwd_cnt.wrapping_add(if echo { n } else { 0 }),
                };
                let src = c.ring + c.head as u64;
                self.send(&h, Some((src, n)))?;
                if let Some(c) = self.conns[i].as_mut() {
                    c.head = (c.head + n) % BUF_ALLOC;
                    c.len -= n;
                    c.tx_cnt = c.tx_cnt.wrapping_add(n);
                    if echo {
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
                    }
                }
                self.echoed += n as u64;
            }
            // Out of credit with a backlog: ask the peer for an update (once per stall).
            let ask = self.conns[i].as_ref().and_then(|c| {
                (c.len > 0 && c.peer_credit() == 0 && !c.credit_requested).then_some(Hdr {
                    src_cid: c.peer_cid,
                    dst_cid: self.cid,
                    src_port: c.peer_port,
                    dst_port: c.local_port,
                    fwd_cnt: c.fwd_cnt,
                    ..Hdr::default()
                })
            });
            if let Some(h) = ask {
                self.reply(&h, OP_CREDIT_REQUEST, 0, h.fwd_cnt)?;
                if let Some(c) = self.conns[i].as_mut() {
                    c.credit_requested = true;
                }
            }
            let now = time::now_ms();
            let done = self.conns[i].as_ref().map(|c| {
                (
                    c.peer_done && c.len == 0,
                    now.saturating_sub(c.last_activity) > CONN_IDLE_MS,
                )
            });
            match done {
                Some((true, _)) | Some((_, true)) => self.close(i, true)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Serves `port` (echo) until `wait_ms` pass without an open connection.
    pub fn serve(&mut self, port: u32, wait_ms: u64) -> Result<(), &'static str> {
        self.serve_service(port, wait_ms, None)
    }

    /// Serves `port` with `svc` (or the echo if `None`) until `wait_ms` pass without an
    /// open connection.
    pub fn serve_service<'s>(
        &mut self,
        port: u32,
        wait_ms: u64,
        mut svc: Option<&mut (dyn Service + 's)>,
    ) -> Result<(), &'static str> {
        self.last_event = time::now_ms();
        loop {
            while let Some((head, used_len)) = self.rx.pop_used() {
                let slot = self
                    .rx_slot_of_head
                    .get(head as usize)
                    .copied()
                    .unwrap_or(0);
                let a = self.rx_base + slot as u64 * RX_SLOT;
                self.stats[1] += 1;
                if used_len >= HDR_LEN {
                    let mut h = Hdr::read(a);
                    h.len = h.len.min(used_len - HDR_LEN).min(RX_DATA);
                    self.handle(&h, a + 4096, port, svc.as_deref_mut())?;
                }
                self.post_rx(slot)?;
                self.rx.kick();
            }
            while let Some((head, _)) = self.ev.pop_used() {
                // VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: every connection is gone, and the CID
                // may have changed (a clone's cloud host gives it a new one): read it again,
                // as Linux does, or every packet to the new CID would be refused.
                for i in 0..MAX_CONNS {
                    if self.conns[i].is_some() {
                        self.conns[i] = None;
                        self.finished += 1;
                    }
                }
                let cid =
                    self.dev.config::<u32>(0) as u64 | (self.dev.config::<u32>(4) as u64) << 32;
                if cid != self.cid {
                    probe!("twin cid={cid}");
                    self.cid = cid;
                }
                let addr = self.ev_buf + 16 * (head as u64 % 8);
                let _ = self.ev.push(&[Buf {
                    addr,
                    len: 8,
                    write: true,
                }]);
                self.ev.kick();
            }
            self.flush(svc.as_deref_mut())?;
            let open = self.conns.iter().any(Option::is_some);
            if !open && time::now_ms().saturating_sub(self.last_event) >= wait_ms {
                return Ok(());
            }
            self.rx.wait_used(20);
        }
    }

    /// How rx completions were noticed.
    pub fn irq_report(&self) {
        probe!(
            "vsock irq={} hits={} polled={} tx_irq={} tx_pkts={} rx_pkts={} tx_wait_us={}",
            self.rx.irq_mode(),
            self.rx.irq_hits,
            self.rx.polled,
            self.tx.irq_mode(),
            self.stats[0],
            self.stats[1],
            time::tsc_to_us(self.stats[2])
        );
    }
}

/// The `vsock` selftest part.
pub fn selftest() {
    let mut v = match Vsock::open() {
        Ok(Some(v)) => v,
        Ok(None) => return probe!("vsock skip no-device"),
        Err(e) => return fail("vsock", format_args!("init {e}")),
    };
    let port = u32::try_from(pvh::info().arg_u64("pv.vsock.port", 1234)).unwrap_or(1234);
    let wait = pvh::info().arg_u64("pv.vsock.wait", 5000);
    probe!("vsock listening cid={} port={}", v.cid, port);
    match v.serve(port, wait) {
        Ok(()) => probe!(
            "vsock ok cid={} conns={} bytes={}",
            v.cid,
            v.finished,
            v.echoed
        ),
        Err(e) => fail("vsock", format_args!("{e}")),
    }
    v.irq_report();
}

/// The vsock device's guest CID, watched without initialising the device (its config is
/// readable before): a clone's cloud host gives the guest a new one, which is how this
/// guest learns it is a twin.
pub struct CidWatch {
    dev: VirtioPci,
    cid: u64,
}

impl CidWatch {
    /// Watches the first vsock device, if there is one.
    pub fn open() -> Option<CidWatch> {
        let f = super::pci::find(TYPE, 0)?;
        let dev = VirtioPci::new(&f).ok()?;
        let cid = Self::read(&dev);
        Some(CidWatch { dev, cid })
    }

    fn read(dev: &VirtioPci) -> u64 {
        dev.config::<u32>(0) as u64 | (dev.config::<u32>(4) as u64) << 32
    }

    /// Prints `PROBE twin cid=N` when the CID changed since the last look.
    pub fn check(&mut self) {
        let cid = Self::read(&self.dev);
        if cid != self.cid {
            probe!("twin cid={cid}");
            self.cid = cid;
        }
    }
}
