//! The vsock worker: moves packets between the guest's queues and host unix streams.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm_sys_util::epoll::{Epoll, EventSet};

use super::conn::{Conn, State};
use super::packet::*;
use crate::narrow::len_u32;
use crate::virtio::chain::Chain;
use crate::virtio::worker::{add_fd, DeviceWorker, Popped, VirtQueue, BACKEND_TOKEN_BASE};
use crate::virtio::{DeviceCounters, Interrupt};
use crate::GuestMem;

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
const LISTENER_TOKEN: u64 = BACKEND_TOKEN_BASE;
/// Largest payload in one packet, either direction.
const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Most connections (and half-open host connections) at once.
const MAX_CONNS: usize = 1024;
/// Most control packets waiting for rx buffers; beyond that new ones are dropped.
const MAX_CONTROL: usize = 4096;
/// First host port handed out for host-initiated connections.
const FIRST_HOST_PORT: u32 = 1024;

type Key = (u32, u32);

/// A host connection that has not finished its `CONNECT <port>\n` line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<DeviceCounters>,
    rx: VirtQueue,
    tx: VirtQueue,
    /// The event queue: only used for a transport reset after a restore.
    event: VirtQueue,
    /// A transport reset is owed to the driver (connections were lost in a restore).
    reset_pending: bool,
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    pending_host: HashMap<u64, PendingHost>,
    conns: HashMap<Key, Conn>,
    by_token: HashMap<u64, Key>,
    control: VecDeque<Header>,
    next_token: u64,
    next_port: u32,
    buf: Vec<u8>,
}

impl Muxer {
    /// A muxer over the rx, tx and event queues (in that order).
    pub fn new(
        mem: GuestMem,
        interrupt: Arc<dyn Interrupt>,
        counters: Arc<DeviceCounters>,
        queues: Vec<VirtQueue>,
        guest_cid: u64,
        uds_path: PathBuf,
        listener: Arc<UnixListener>,
    ) -> Option<Muxer> {
        let mut queues = queues.into_iter();
        let (rx, tx, event) = (queues.next()?, queues.next()?, queues.next()?);
        Some(Muxer {
            mem,
            interrupt,
            counters,
            rx,
            tx,
            event,
            reset_pending: false,
            guest_cid,
            uds_path,
            listener,
            pending_host: HashMap::new(),
            conns: HashMap::new(),
            by_token: HashMap::new(),
            control: VecDeque::new(),
            next_token: LISTENER_TOKEN + 1,
            next_port: FIRST_HOST_PORT,
            buf: vec![0; MAX_PKT_PAYLOAD],
        })
    }

    /// Makes the muxer tell the driver, as soon as it has an event buffer, that every
    /// connection is gone (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`).
    pub fn owe_transport_reset(&mut self) {
        self.reset_pending = true;
    }

    /// Sends an owed transport reset if the driver has posted an event buffer.
    fn process_event(&mut self) {
        if !self.reset_pending {
            return;
        }
        let interrupt = self.interrupt.clone();
        let Some(popped) = self.event.pop(&self.mem, &*interrupt) else {
            return;
        };
        let (head, len) = match popped {
            Popped::Chain(chain) => {
                let ok = chain.writable_len() >= 4
                    && chain
                        .write_at(&self.mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes())
                        .is_ok();
                if ok {
                    self.reset_pending = false;
                }
                (chain.head, if ok { 4 } else { 0 })
            }
            Popped::Malformed { head, .. } => (head, 0),
        };
        if self.event.complete(&self.mem, &*interrupt, head, len) {
            self.event.notify(&self.mem, &*interrupt);
        }
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(LISTENER_TOKEN + 1);
        t
    }

    fn queue_control(&mut self, hdr: Header) {
        if self.control.len() >= MAX_CONTROL {
            crate::guest_warn!("virtio-vsock: control queue full, dropping op {}", hdr.op);
            return;
        }
        self.control.push_back(hdr);
    }

    /// Queues a RST answering `hdr` (a packet from the guest).
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            return;
        }
        self.queue_control(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    /// Drops a connection; if `rst`, tells the guest.
    fn close(&mut self, key: Key, rst: bool) {
        if let Some(mut conn) = self.conns.remove(&key) {
            self.by_token.remove(&conn.token);
            // Best effort: hand the host what the guest already sent.
            let _ = conn.flush();
            if rst {
                let hdr = conn.header(self.guest_cid, OP_RST);
                self.queue_control(hdr);
            }
        }
    }

    fn register_stream(&self, epoll: &Epoll, stream: &UnixStream, token: u64) -> io::Result<()> {
        add_fd(
            epoll,
            stream.as_raw_fd(),
            token,
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
        )
    }

    fn free_host_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNS {
            let port = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|&(local, _)| local == port) {
                return Some(port);
            }
        }
        None
    }

    // ---- host side ----

    fn accept_host(&mut self, epoll: &Epoll) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        crate::guest_warn!("virtio-vsock: accept failed: {e}");
                    }
                    return;
                }
            };
            if self.pending_host.len() + self.conns.len() >= MAX_CONNS {
                crate::guest_warn!("virtio-vsock: too many connections, refusing one");
                continue;
            }
            let token = self.token();
            if stream.set_nonblocking(true).is_err()
                || self.register_stream(epoll, &stream, token).is_err()
            {
                continue;
            }
            self.pending_host.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::new(),
                },
            );
            self.read_connect_line(token);
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (so no payload is consumed).
    fn read_connect_line(&mut self, token: u64) {
        let Some(pending) = self.pending_host.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let line = loop {
            match pending.stream.read(&mut byte) {
                Ok(0) => {
                    self.pending_host.remove(&token);
                    return;
                }
                Ok(_) if byte[0] == b'\n' => break std::mem::take(&mut pending.line),
                Ok(_) if pending.line.len() < MAX_CONNECT_LINE => pending.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                _ => {
                    self.pending_host.remove(&token);
                    return;
                }
            }
        };
        let Some(PendingHost { stream, .. }) = self.pending_host.remove(&token) else {
            return;
        };
        let Some(peer_port) = parse_connect(&line) else {
            crate::guest_debug!("virtio-vsock: bad connect line from host");
            return;
        };
        let Some(local_port) = self.free_host_port() else {
            return;
        };
        let mut conn = Conn::new(stream, token, State::Connecting, local_port, peer_port);
        let hdr = conn.header(self.guest_cid, OP_REQUEST);
        self.by_token.insert(token, (local_port, peer_port));
        self.conns.insert((local_port, peer_port), conn);
        self.queue_control(hdr);
    }

    fn host_stream_event(&mut self, token: u64, events: EventSet) {
        let Some(&key) = self.by_token.get(&token) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            conn.readable = true;
        }
        if events.contains(EventSet::OUT) && self.flush_conn(key).is_err() {
            self.close(key, true);
        }
    }

    /// Flushes guest data to the host and sends a credit update if enough space was freed.
    fn flush_conn(&mut self, key: Key) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(&key) else {
            return Ok(());
        };
        conn.flush()?;
        if conn.state == State::Established && conn.needs_credit_update() {
            let hdr = conn.header(self.guest_cid, OP_CREDIT_UPDATE);
            self.queue_control(hdr);
        }
        Ok(())
    }

    // ---- guest -> host ----

    fn process_tx(&mut self, epoll: &Epoll) {
        let interrupt = self.interrupt.clone();
        while let Some(popped) = self.tx.pop(&self.mem, &*interrupt) {
            let head = match popped {
                Popped::Chain(chain) => {
                    self.counters.request(chain.readable_len() as u64);
                    self.handle_tx_packet(epoll, &chain);
                    chain.head
                }
                Popped::Malformed { head, error } => {
                    crate::guest_warn!("virtio-vsock: malformed tx chain: {error}");
                    self.counters.error();
                    head
                }
            };
            if !self.tx.complete(&self.mem, &*interrupt, head, 0) {
                break;
            }
        }
        self.tx.notify(&self.mem, &*interrupt);
    }

    fn handle_tx_packet(&mut self, epoll: &Epoll, chain: &Chain) {
        let mut raw = [0u8; HDR_LEN];
        if chain.read_at(&self.mem, 0, &mut raw).is_err() {
            crate::guest_debug!("virtio-vsock: tx packet shorter than a header");
            return;
        }
        let hdr = Header::from_bytes(&raw);
        let len = hdr.len as usize;
        if len > MAX_PKT_PAYLOAD || len > chain.readable_len().saturating_sub(HDR_LEN) {
            crate::guest_debug!("virtio-vsock: tx packet length {len} exceeds its buffer");
            return;
        }
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            crate::guest_debug!(
                "virtio-vsock: dropping packet {}->{}",
                hdr.src_cid,
                hdr.dst_cid
            );
            return;
        }
        if hdr.kind != TYPE_STREAM {
            self.reply_rst(&hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op == OP_REQUEST {
                self.connect_to_host(epoll, &hdr);
            } else {
                self.reply_rst(&hdr);
            }
            return;
        };
        conn.update_peer_credit(&hdr);
        match (hdr.op, conn.state) {
            (OP_RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                // Nothing is pending before the RESPONSE: the host waits for this line.
                conn.push_own(format!("OK {}\n", conn.local_port).as_bytes());
                if self.flush_conn(key).is_err() {
                    self.close(key, true);
                }
            }
            (OP_RW, State::Established) => {
                let data = &mut self.buf[..len];
                if chain.read_at(&self.mem, HDR_LEN, data).is_err()
                    || conn.push_guest_data(data).is_err()
                {
                    crate::guest_debug!("virtio-vsock: guest overran its credit");
                    self.close(key, true);
                    return;
                }
                if self.flush_conn(key).is_err() {
                    self.close(key, true);
                }
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, State::Established) => {
                let hdr = conn.header(self.guest_cid, OP_CREDIT_UPDATE);
                self.queue_control(hdr);
            }
            (OP_SHUTDOWN, State::Established) => {
                if hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    self.close(key, true);
                    return;
                }
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                    if self.flush_conn(key).is_err() {
                        self.close(key, true);
                    }
                }
            }
            (OP_RST, _) => self.close(key, false),
            _ => self.close(key, true),
        }
    }

    /// A guest REQUEST to host port P: connect to `<uds_path>_<P>`.
    fn connect_to_host(&mut self, epoll: &Epoll, hdr: &Header) {
        if self.pending_host.len() + self.conns.len() >= MAX_CONNS {
            self.reply_rst(hdr);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(e) => {
                crate::guest_debug!("virtio-vsock: cannot connect to {path:?}: {e}");
                self.reply_rst(hdr);
                return;
            }
        };
        let token = self.token();
        if stream.set_nonblocking(true).is_err()
            || self.register_stream(epoll, &stream, token).is_err()
        {
            self.reply_rst(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let mut conn = Conn::new(stream, token, State::Established, key.0, key.1);
        conn.update_peer_credit(hdr);
        let response = conn.header(self.guest_cid, OP_RESPONSE);
        self.by_token.insert(token, key);
        self.conns.insert(key, conn);
        self.queue_control(response);
    }

    // ---- host -> guest ----

    /// Fills rx buffers with control packets first, then host data as credit allows.
    fn process_rx(&mut self) {
        let interrupt = self.interrupt.clone();
        loop {
            if self.control.is_empty() && !self.conns.values().any(Conn::wants_rx) {
                break;
            }
            let chain = match self.rx.pop(&self.mem, &*interrupt) {
                None => break,
                Some(Popped::Malformed { head, error }) => {
                    crate::guest_warn!("virtio-vsock: malformed rx buffer: {error}");
                    self.counters.error();
                    if !self.rx.complete(&self.mem, &*interrupt, head, 0) {
                        break;
                    }
                    continue;
                }
                Some(Popped::Chain(chain)) => chain,
            };
            if chain.writable_len() < HDR_LEN {
                if !self.rx.complete(&self.mem, &*interrupt, chain.head, 0) {
                    break;
                }
                continue;
            }
            let used = match self.control.pop_front() {
                Some(hdr) => write_packet(&self.mem, &chain, &hdr, &[]),
                None => match self.next_data_packet(&chain) {
                    Some(used) => used,
                    None => {
                        self.rx.undo_pop();
                        break;
                    }
                },
            };
            self.counters.request(u64::from(used));
            if !self.rx.complete(&self.mem, &*interrupt, chain.head, used) {
                break;
            }
        }
        self.rx.notify(&self.mem, &*interrupt);
    }

    /// Reads host data for one connection into `chain`; returns the used length, or `None` if
    /// no connection had anything to send.
    fn next_data_packet(&mut self, chain: &Chain) -> Option<u32> {
        let room = chain
            .writable_len()
            .saturating_sub(HDR_LEN)
            .min(MAX_PKT_PAYLOAD);
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.wants_rx())
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let credit = conn.peer_credit() as usize;
            if credit == 0 {
                if !conn.credit_requested {
                    conn.credit_requested = true;
                    let hdr = conn.header(self.guest_cid, OP_CREDIT_REQUEST);
                    return Some(write_packet(&self.mem, chain, &hdr, &[]));
                }
                continue;
            }
            let want = room.min(credit);
            let buf = &mut self.buf[..want];
            match conn.stream.read(buf) {
                Ok(0) => {
                    conn.host_eof = true;
                    let mut hdr = conn.header(self.guest_cid, OP_SHUTDOWN);
                    hdr.flags = SHUTDOWN_SEND;
                    return Some(write_packet(&self.mem, chain, &hdr, &[]));
                }
                Ok(n) => {
                    // n <= MAX_PKT_PAYLOAD fits in u32.
                    conn.rx_cnt = conn.rx_cnt.wrapping_add(len_u32(n));
                    let mut hdr = conn.header(self.guest_cid, OP_RW);
                    hdr.len = len_u32(n);
                    let data = &self.buf[..n];
                    return Some(write_packet(&self.mem, chain, &hdr, data));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    let hdr = conn.header(self.guest_cid, OP_RST);
                    self.close(key, false);
                    return Some(write_packet(&self.mem, chain, &hdr, &[]));
                }
            }
        }
        None
    }
}

/// Writes a packet into an rx chain (which has room for the header and `data`); returns the
/// used length (0 if guest memory refused the write).
fn write_packet(mem: &GuestMem, chain: &Chain, hdr: &Header, data: &[u8]) -> u32 {
    let ok = chain.write_at(mem, 0, &hdr.to_bytes()).is_ok()
        && chain.write_at(mem, HDR_LEN, data).is_ok();
    if ok {
        // HDR_LEN + data (<= MAX_PKT_PAYLOAD) fits in u32.
        len_u32(HDR_LEN + data.len())
    } else {
        0
    }
}

/// Connects to the unix socket at `path` without blocking: a listener whose backlog is full
/// fails with EAGAIN instead of stalling the worker.
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(io::ErrorKind::Unsupported))?;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr_len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `addr` is a valid sockaddr_un and the length passed is its size.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            addr_len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Parses `CONNECT <port>` (without the newline).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl DeviceWorker for Muxer {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        add_fd(
            epoll,
            self.listener.as_raw_fd(),
            LISTENER_TOKEN,
            EventSet::IN,
        )
    }

    fn queue_kicked(&mut self, epoll: &Epoll, queue: usize) {
        match queue {
            RX => self.process_rx(),
            TX => {
                self.process_tx(epoll);
                self.process_rx();
            }
            EVENT => self.process_event(),
            _ => {}
        }
    }

    fn backend_event(&mut self, epoll: &Epoll, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_host(epoll);
        } else if self.pending_host.contains_key(&token) {
            self.read_connect_line(token);
        } else {
            self.host_stream_event(token, events);
        }
        self.process_rx();
    }
}

#[cfg(test)]
mod tests {
    use super::super::conn::CONN_BUF_ALLOC;
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(&[0xFF, 0xFE]), None);
    }

    #[test]
    fn buffer_sizes_are_consistent() {
        assert!(MAX_PKT_PAYLOAD <= CONN_BUF_ALLOC as usize);
    }
}
