//! The migration wire format: a handshake, then framed, versioned, authenticated messages.
//!
//! ```text
//! hello:  magic "PVMG" | version u16 | nonce [32]      (each side sends one, unauthenticated)
//! frame:  magic "PVMG" | version u16 | kind u8 | 0 u8 | seq u64 | length u32 | payload | mac [32]
//! ```
//!
//! Integers are little-endian. Both sides hold the same 32-byte migration key; each
//! direction authenticates with its own key, `HMAC-SHA256(key, label | destination nonce |
//! source nonce)`, so a frame from another session, or sent back the other way, fails its
//! check. `mac` is HMAC-SHA256 over the header and payload; `seq` counts the frames of one
//! direction from 0, so a replayed, dropped or reordered frame is refused. A frame is checked
//! whole (version, length limit, mac, sequence) before its payload means anything.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The first four bytes of every hello and frame.
pub const MAGIC: [u8; 4] = *b"PVMG";
/// The protocol version this build speaks (2: disks travel in `Disk` frames; 3: the `State`
/// frame is zstd-compressed; 4: the destination answers `Setup` with `Base`).
pub const VERSION: u16 = 4;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 20;
/// Bytes of a frame's MAC.
pub const MAC_LEN: usize = 32;
/// Bytes of a hello.
pub const HELLO_LEN: usize = 6 + NONCE_LEN;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of the migration key.
pub const KEY_LEN: usize = 32;
/// The largest payload a reader accepts (a state container may be large: GPU resources).
pub const MAX_PAYLOAD: u32 = 272 << 20;

type HmacSha256 = Hmac<Sha256>;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source to destination: the configuration and memory layout (JSON).
    Setup = 1,
    /// Source to destination: runs of guest pages (`addr u64 | length u32 | bytes`, repeated).
    Pages = 2,
    /// Source to destination: the paused VM's state container (`state.bin`).
    State = 3,
    /// Destination to source: everything checked, the VM is built and waits for `Commit`.
    Ready = 4,
    /// Source to destination: the source is paused for good; run the guest.
    Commit = 5,
    /// Destination to source: the guest runs here.
    Running = 6,
    /// Either way: the sender gives up (payload: the reason, UTF-8).
    Abort = 7,
    /// Source to destination: a round of pages is complete; answer with `RoundAck`.
    RoundEnd = 8,
    /// Destination to source: every page of the round has arrived (the source times the
    /// link by it).
    RoundAck = 9,
    /// Source to destination: runs of disk data (`disk u32 | offset u64 | length u32 | bytes`,
    /// repeated; see the `disk` module).
    Disk = 10,
    /// Source to destination, first and only to a cloud host: what the source asks of it
    /// (`offload NAME`, UTF-8; see `pocketvisor cloud serve`).
    Request = 11,
    /// Destination to source, the answer to `Setup`: the digests of the copy it starts from
    /// (empty: none; see the `base` module), so round 1 sends only what differs.
    Base = 12,
    /// Cloud host to device, the answer to a `return NAME` request: accepted; the twin's
    /// migration to the device follows on the same connection, from a new hello.
    Accept = 13,
    /// Either way, after a `replicate` or `recover` request: a piece of a sealed replica
    /// checkpoint file (see the `checkpoints` module).
    Checkpoint = 14,
    /// Either way: the checkpoint file whose pieces came before is whole (payload: its
    /// sequence number in its chain, `u64`).
    CheckpointEnd = 15,
    /// Cloud host to device: the checkpoint is stored, synced and renamed into place.
    Stored = 16,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Setup,
            2 => Kind::Pages,
            3 => Kind::State,
            4 => Kind::Ready,
            5 => Kind::Commit,
            6 => Kind::Running,
            7 => Kind::Abort,
            8 => Kind::RoundEnd,
            9 => Kind::RoundAck,
            10 => Kind::Disk,
            11 => Kind::Request,
            12 => Kind::Base,
            13 => Kind::Accept,
            14 => Kind::Checkpoint,
            15 => Kind::CheckpointEnd,
            16 => Kind::Stored,
            _ => return None,
        })
    }
}

/// Why the wire refused a message or could not carry it.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or ended.
    #[error("migration connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer speaks something else.
    #[error("migration refused: not a pocketvisor migration peer (bad magic)")]
    Magic,
    /// The peer speaks another version of the protocol.
    #[error(
        "migration refused: the peer speaks protocol version {0}, this build speaks {VERSION}"
    )]
    Version(u16),
    /// A frame claims more than [`MAX_PAYLOAD`] bytes.
    #[error("migration refused: a frame of {0} bytes")]
    TooLong(u32),
    /// A frame's MAC does not match: damaged, forged, or sent under another key or session.
    #[error("migration refused: a frame failed authentication (damaged, forged, or another key)")]
    Mac,
    /// An authentic frame arrived out of order: replayed or reordered.
    #[error(
        "migration refused: frame {got} arrived where {expected} was due (replayed or reordered)"
    )]
    Sequence {
        /// The frame's sequence number.
        got: u64,
        /// The one expected.
        expected: u64,
    },
    /// An authentic frame of a kind this build does not know.
    #[error("migration refused: unknown frame kind {0}")]
    Kind(u8),
}

/// A checked frame.
#[derive(Debug)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Which end of a migration this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The host the VM leaves.
    Source,
    /// The host the VM goes to.
    Destination,
}

/// One migration connection after the handshake: sends and receives checked frames.
pub struct Channel<S> {
    stream: S,
    send_key: HmacSha256,
    recv_key: HmacSha256,
    send_seq: u64,
    recv_seq: u64,
    /// Bytes written so far (handshake included).
    pub bytes_sent: u64,
    /// Bytes of checked frames and the hello read so far.
    pub bytes_received: u64,
}

fn direction_key(key: &[u8; KEY_LEN], label: &[u8], dst: &[u8], src: &[u8]) -> HmacSha256 {
    let mut derive = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    derive.update(label);
    derive.update(dst);
    derive.update(src);
    let k = derive.finalize().into_bytes();
    HmacSha256::new_from_slice(&k).expect("HMAC takes any key length")
}

/// A fresh random nonce.
fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < n.len() {
        let rest = &mut n[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the call.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(r) {
            Ok(got) => filled += got,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(n)
}

impl<S: Read + Write> Channel<S> {
    /// Exchanges hellos over `stream` and derives this session's keys from `key`.
    pub fn handshake(mut stream: S, key: &[u8; KEY_LEN], role: Role) -> Result<Self, WireError> {
        let mine = nonce()?;
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&VERSION.to_le_bytes());
        hello.extend_from_slice(&mine);
        stream.write_all(&hello)?;
        stream.flush()?;
        let mut theirs = [0u8; HELLO_LEN];
        stream.read_exact(&mut theirs)?;
        check_magic_version(&theirs[..6])?;
        let theirs = &theirs[6..];
        let (dst, src) = match role {
            Role::Source => (theirs, &mine[..]),
            Role::Destination => (&mine[..], theirs),
        };
        let to_dst = direction_key(
            key,
            b"pocketvisor migration v1 source to destination",
            dst,
            src,
        );
        let to_src = direction_key(
            key,
            b"pocketvisor migration v1 destination to source",
            dst,
            src,
        );
        let (send_key, recv_key) = match role {
            Role::Source => (to_dst, to_src),
            Role::Destination => (to_src, to_dst),
        };
        Ok(Channel {
            stream,
            send_key,
            recv_key,
            send_seq: 0,
            recv_seq: 0,
            bytes_sent: HELLO_LEN as u64,
            bytes_received: HELLO_LEN as u64,
        })
    }

    /// Sends one frame.
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD)
            .ok_or(WireError::TooLong(u32::MAX))?;
        let header = header(kind as u8, self.send_seq, len);
        let mut mac = self.send_key.clone();
        mac.update(&header);
        mac.update(payload);
        let mac = mac.finalize().into_bytes();
        self.stream.write_all(&header)?;
        self.stream.write_all(payload)?;
        self.stream.write_all(&mac)?;
        self.send_seq += 1;
        self.bytes_sent += (HEADER_LEN + payload.len() + MAC_LEN) as u64;
        Ok(())
    }

    /// Flushes what was sent.
    pub fn flush(&mut self) -> Result<(), WireError> {
        Ok(self.stream.flush()?)
    }

    /// Receives and checks the next frame.
    pub fn recv(&mut self) -> Result<Frame, WireError> {
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header)?;
        check_magic_version(&header[..6])?;
        let kind = header[6];
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD || header[7] != 0 {
            return Err(WireError::TooLong(len));
        }
        let mut payload = vec![0u8; usize::try_from(len).map_err(|_| WireError::TooLong(len))?];
        self.stream.read_exact(&mut payload)?;
        let mut mac = [0u8; MAC_LEN];
        self.stream.read_exact(&mut mac)?;
        let mut check = self.recv_key.clone();
        check.update(&header);
        check.update(&payload);
        check.verify_slice(&mac).map_err(|_| WireError::Mac)?;
        if seq != self.recv_seq {
            return Err(WireError::Sequence {
                got: seq,
                expected: self.recv_seq,
            });
        }
        self.recv_seq += 1;
        self.bytes_received += (HEADER_LEN + payload.len() + MAC_LEN) as u64;
        let kind = Kind::from_u8(kind).ok_or(WireError::Kind(kind))?;
        Ok(Frame { kind, payload })
    }

    /// The underlying stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, to end or drain it.
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The underlying stream, for another session on the same connection (a new hello).
    pub fn into_stream(self) -> S {
        self.stream
    }
}

fn check_magic_version(b: &[u8]) -> Result<(), WireError> {
    if b[..4] != MAGIC {
        return Err(WireError::Magic);
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    Ok(())
}

fn header(kind: u8, seq: u64, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6] = kind;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&len.to_le_bytes());
    h
}

/// Reads a migration key file: exactly 64 hexadecimal digits (a trailing newline allowed).
pub fn read_key(path: &std::path::Path) -> Result<[u8; KEY_LEN], String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the migration key {}: {e}", path.display()))?;
    parse_key(text.trim_end_matches('\n')).ok_or_else(|| {
        format!(
            "{}: a migration key is 64 hexadecimal digits",
            path.display()
        )
    })
}

fn parse_key(hex: &str) -> Option<[u8; KEY_LEN]> {
    if hex.len() != KEY_LEN * 2 || !hex.is_ascii() {
        return None;
    }
    let mut key = [0u8; KEY_LEN];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair(a: [u8; 32], b: [u8; 32]) -> (Channel<UnixStream>, Channel<UnixStream>) {
        let (x, y) = UnixStream::pair().unwrap();
        let dst = std::thread::spawn(move || Channel::handshake(y, &b, Role::Destination));
        let src = Channel::handshake(x, &a, Role::Source).unwrap();
        (src, dst.join().unwrap().unwrap())
    }

    #[test]
    fn frames_arrive_checked_and_in_order() {
        let (mut s, mut d) = pair([7; 32], [7; 32]);
        s.send(Kind::Setup, b"{}").unwrap();
        s.send(Kind::Pages, &[1; 5000]).unwrap();
        let f = d.recv().unwrap();
        assert_eq!((f.kind, &f.payload[..]), (Kind::Setup, &b"{}"[..]));
        assert_eq!(d.recv().unwrap().payload, vec![1; 5000]);
        d.send(Kind::Ready, &[]).unwrap();
        assert_eq!(s.recv().unwrap().kind, Kind::Ready);
    }

    #[test]
    fn another_key_is_refused() {
        let (mut s, mut d) = pair([7; 32], [8; 32]);
        s.send(Kind::Setup, b"{}").unwrap();
        assert!(matches!(d.recv(), Err(WireError::Mac)));
    }

    #[test]
    fn a_frame_sent_back_the_other_way_is_refused() {
        // A frame the source sent, played back to it as if from the destination.
        let (x, y) = UnixStream::pair().unwrap();
        let dst = std::thread::spawn(move || Channel::handshake(y, &[7; 32], Role::Destination));
        let mut s = Channel::handshake(x, &[7; 32], Role::Source).unwrap();
        let mut d = dst.join().unwrap().unwrap();
        s.send(Kind::Commit, &[]).unwrap();
        let mut raw = vec![0u8; HEADER_LEN + MAC_LEN];
        d.stream.read_exact(&mut raw).unwrap();
        d.stream.write_all(&raw).unwrap();
        assert!(matches!(s.recv(), Err(WireError::Mac)));
    }

    #[test]
    fn a_version_3_peer_is_refused_in_words() {
        // A build of protocol 3 (no `Base` answer to `Setup`) says hello.
        let (x, mut y) = UnixStream::pair().unwrap();
        let old = std::thread::spawn(move || {
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&3u16.to_le_bytes());
            hello.extend_from_slice(&[0; NONCE_LEN]);
            y.write_all(&hello).unwrap();
            let mut theirs = [0u8; HELLO_LEN];
            y.read_exact(&mut theirs).unwrap();
            theirs
        });
        let err = Channel::handshake(x, &[7; 32], Role::Source)
            .err()
            .expect("refused");
        assert!(matches!(err, WireError::Version(3)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "migration refused: the peer speaks protocol version 3, this build speaks 4"
        );
        // The old peer is told this build's version in the hello, and refuses it likewise.
        let theirs = old.join().unwrap();
        assert_eq!(u16::from_le_bytes([theirs[4], theirs[5]]), 4);
    }

    #[test]
    fn keys_parse_strictly() {
        let hex = "00ff".repeat(16);
        assert_eq!(parse_key(&hex).unwrap()[1], 0xff);
        assert!(parse_key(&hex[..62]).is_none());
        assert!(parse_key(&"zz".repeat(32)).is_none());
        assert!(parse_key(&"é".repeat(32)).is_none());
    }
}
