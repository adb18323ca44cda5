//! One vsock stream connection between a guest port and a host unix stream, with the credit
//! accounting of virtio-vsock: the guest may have at most `buf_alloc` bytes in flight towards
//! us, and we at most the guest's `buf_alloc` towards it.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::packet::{Header, HOST_CID, TYPE_STREAM};

/// Receive buffer we advertise per connection: guest data not yet written to the host stream.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// A connection keyed by (host port, guest port).
#[derive(Debug)]
pub struct Conn {
    pub stream: UnixStream,
    pub token: u64,
    pub state: State,
    pub local_port: u32,
    pub peer_port: u32,
    /// The guest's advertised receive buffer and how much of it it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub rx_cnt: u32,
    /// Bytes of guest data written to the host stream.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub fwd_cnt_sent: u32,
    /// Bytes waiting for the host stream to accept them (<= CONN_BUF_ALLOC).
    pub pending: Vec<u8>,
    /// How many leading bytes of `pending` are ours (the `OK` line), not guest data.
    pub pending_own: usize,
    /// The host stream may have data to read (edge-triggered; cleared on EAGAIN).
    pub readable: bool,
    /// The host closed its sending side; SHUTDOWN was sent to the guest.
    pub host_eof: bool,
    /// The guest will send no more: shut the host stream's write side once `pending` drains.
    pub guest_done_sending: bool,
    /// A CREDIT_REQUEST is outstanding.
    pub credit_requested: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, token: u64, state: State, local: u32, peer: u32) -> Conn {
        Conn {
            stream,
            token,
            state,
            local_port: local,
            peer_port: peer,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            pending: Vec::new(),
            pending_own: 0,
            readable: true,
            host_eof: false,
            guest_done_sending: false,
            credit_requested: false,
        }
    }

    /// A header from us to the guest on this connection (records the fwd_cnt we advertise).
    pub fn header(&mut self, guest_cid: u64, op: u16) -> Header {
        self.fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Records the guest's credit information from one of its packets.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        if (hdr.buf_alloc, hdr.fwd_cnt) != (self.peer_buf_alloc, self.peer_fwd_cnt) {
            self.peer_buf_alloc = hdr.buf_alloc;
            self.peer_fwd_cnt = hdr.fwd_cnt;
            self.credit_requested = false;
        }
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether there may be host data to send to the guest now.
    pub fn wants_rx(&self) -> bool {
        self.state == State::Established && self.readable && !self.host_eof
    }

    /// Queues a line of our own (not guest data, so not counted in `fwd_cnt`) for the host.
    pub fn push_own(&mut self, line: &[u8]) {
        self.pending.extend_from_slice(line);
        self.pending_own += line.len();
    }

    /// Queues guest data for the host stream. Fails if the guest exceeded the credit we gave.
    pub fn push_guest_data(&mut self, data: &[u8]) -> Result<(), ()> {
        if self.pending.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(());
        }
        self.pending.extend_from_slice(data);
        Ok(())
    }

    /// Writes as much pending guest data to the host stream as it takes, and shuts its write
    /// side when the guest is done and everything is written.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    let own = n.min(self.pending_own);
                    self.pending_own -= own;
                    // n <= CONN_BUF_ALLOC fits in u32.
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(crate::narrow::len_u32(n - own));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Whether the guest should be told about freed buffer space (a quarter of it unreported).
    pub fn needs_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CONN_BUF_ALLOC / 4
    }
}
