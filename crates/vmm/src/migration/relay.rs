//! The cloud host's relays: bytes carried both ways and unchanged between a TLS connection and
//! a local socket. For a view, the host carries the twin's RFB display to the device, and the
//! device carries it on to a viewer of its own; for a vsock connection, the twin's vsock
//! socket. A migration can go through one too (its own hello, framing and key authenticate the
//! bytes end to end, and the relay reads none of them), but the cloud host's returns go
//! through [`super::proxy`], which re-authenticates each frame under the device's key so the
//! twin's jailed VMM never holds it.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rustls::{Connection, StreamOwned};

use super::refused;
use super::tls::Transport;
use crate::Error;

/// Bytes carried each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// From the TLS connection to the local end (for a return, the device's hello, the base's
    /// digests and its answers to the twin).
    pub to_local: u64,
    /// From the local end to the TLS connection (for a return, the migration).
    pub to_tls: u64,
}

/// The local end of a relay: a connected socket whose two directions are used at once.
pub trait LocalEnd: Sync
where
    for<'a> &'a Self: Read + Write,
{
    /// Ends one direction of the socket.
    fn shut(&self, how: Shutdown);
    /// Makes reads wait for as long as it takes: the local end's own timeouts end it.
    fn untimed(&self) -> std::io::Result<()>;
}

impl LocalEnd for UnixStream {
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
    fn untimed(&self) -> std::io::Result<()> {
        self.set_read_timeout(None)
    }
}

impl LocalEnd for TcpStream {
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
    fn untimed(&self) -> std::io::Result<()> {
        self.set_read_timeout(None)
    }
}

const BUF: usize = 64 << 10;

/// Carries bytes between `remote` (a TLS connection, either end of it) and `local` until both
/// directions have ended. The local end decides when it is over: once it has closed, the
/// remote end is told (TLS `close_notify`, then the socket's end) and its direction ends when
/// the remote end closes or, past the socket's read timeout, at once. A remote end that closes
/// first ends the local end's writing direction. Either direction failing ends the other.
pub fn relay<L>(remote: Transport, local: L) -> Result<Relayed, Error>
where
    L: LocalEnd,
    for<'a> &'a L: Read + Write,
{
    let (conn, sock): (Connection, TcpStream) = match remote {
        Transport::Server(tls) => {
            let StreamOwned { conn, sock } = *tls;
            (conn.into(), sock)
        }
        Transport::Client(tls) => {
            let StreamOwned { conn, sock } = *tls;
            (conn.into(), sock)
        }
        Transport::Plain(_) | Transport::Local(_) => {
            return Err(refused("a relay carries a TLS connection only"))
        }
    };
    local
        .untimed()
        .map_err(|e| refused(format!("relay: the local end: {e}")))?;
    let far = Remote {
        conn: Mutex::new(conn),
        writing: Mutex::new(()),
        sock: &sock,
    };
    let local_done = AtomicBool::new(false);
    let (up, down) = std::thread::scope(|s| {
        let up = s.spawn(|| {
            let r = remote_to_local(&far, &local, &local_done);
            // The local end reads to the end of what the remote end said.
            local.shut(Shutdown::Write);
            r
        });
        let down = local_to_remote(&far, &local);
        if down.is_err() {
            local.shut(Shutdown::Both);
        }
        local_done.store(true, Ordering::Release);
        let mut c = far.conn();
        c.send_close_notify();
        let _ = far.flush(c);
        let _ = sock.shutdown(Shutdown::Write);
        let up = up
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the relay's thread panicked")));
        (up, down)
    });
    Ok(Relayed {
        to_tls: down.map_err(|e| refused(format!("relay, local end to TLS: {e}")))?,
        to_local: up.map_err(|e| refused(format!("relay, TLS to local end: {e}")))?,
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The TLS end: its state, and its socket's writing turn.
struct Remote<'a> {
    conn: Mutex<Connection>,
    writing: Mutex<()>,
    sock: &'a TcpStream,
}

impl Remote<'_> {
    fn conn(&self) -> MutexGuard<'_, Connection> {
        lock(&self.conn)
    }

    /// Writes what TLS has to send, then lets go of `c`. The writing turn is taken before `c`
    /// is let go, so records leave in the order TLS made them, and the write itself does not
    /// hold up the other direction's decryption.
    fn flush(&self, mut c: MutexGuard<'_, Connection>) -> std::io::Result<()> {
        let mut records = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut records)?;
        }
        if records.is_empty() {
            // Nothing to write: no turn to wait for behind a write that may be slow.
            return Ok(());
        }
        let _turn = lock(&self.writing);
        drop(c);
        let mut sock = self.sock;
        sock.write_all(&records)
    }
}

/// Moves the plaintext TLS has decrypted into `out`; true once the remote end said
/// `close_notify`.
fn drain(c: &mut Connection, buf: &mut [u8], out: &mut Vec<u8>) -> std::io::Result<bool> {
    loop {
        match c.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

fn remote_to_local<L>(
    far: &Remote<'_>,
    mut local: &L,
    local_done: &AtomicBool,
) -> std::io::Result<u64>
where
    for<'a> &'a L: Read + Write,
{
    let mut raw = vec![0u8; BUF];
    let mut plain = vec![0u8; BUF];
    let mut out = Vec::with_capacity(BUF);
    let mut total = 0u64;
    // First what TLS already holds (read along with the request).
    let mut closed = drain(&mut far.conn(), &mut plain, &mut out)?;
    let mut sock = far.sock;
    loop {
        local.write_all(&out)?;
        total += out.len() as u64;
        out.clear();
        if closed {
            return Ok(total);
        }
        let n = match sock.read(&mut raw) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            // The socket's timeout ticks: go on unless the local side is over.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if local_done.load(Ordering::Acquire) {
                    return Ok(total);
                }
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut c = far.conn();
        let mut rest = &raw[..n];
        while !rest.is_empty() && !closed {
            c.read_tls(&mut rest)?;
            c.process_new_packets().map_err(std::io::Error::other)?;
            // Taken out at once: TLS holds only a little decrypted data.
            closed = drain(&mut c, &mut plain, &mut out)?;
        }
        // TLS may answer (a key update).
        far.flush(c)?;
    }
}

fn local_to_remote<L>(far: &Remote<'_>, mut local: &L) -> std::io::Result<u64>
where
    for<'a> &'a L: Read + Write,
{
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = match local.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let mut c = far.conn();
            let took = c.writer().write(rest)?;
            if took == 0 {
                return Err(ErrorKind::WriteZero.into());
            }
            rest = &rest[took..];
            far.flush(c)?;
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::tls::tests::{cross, issue, scratch};
    use crate::migration::tls::{client, server};
    use std::net::TcpListener;

    fn data(len: usize, step: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i * step % 251).unwrap())
            .collect()
    }

    #[test]
    fn bytes_cross_both_ways_at_once_unchanged_and_the_device_is_told_the_end() {
        let dir = scratch("relay");
        let dev_files = issue(&dir, "dev", &["device.example"]);
        let host_files = issue(&dir, "host", &["127.0.0.1"]);
        let (to_twin, to_device) = (data(3 << 20, 31), data(5 << 20, 17));
        let host_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = host_listener.local_addr().unwrap().to_string();
        let (twin_here, t) = UnixStream::pair().unwrap();

        // The twin sends all it has while it reads what comes, then ends its side.
        let sent = to_device.clone();
        let twin = std::thread::spawn(move || {
            let writer = t.try_clone().unwrap();
            let w = std::thread::spawn(move || {
                (&writer).write_all(&sent).unwrap();
                writer.shutdown(Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            (&t).read_to_end(&mut got).unwrap();
            w.join().unwrap();
            got
        });
        let host = {
            let files = cross(&host_files, &dev_files);
            std::thread::spawn(move || {
                let (tcp, _) = host_listener.accept().unwrap();
                super::super::configure(&tcp).unwrap();
                let device = server(tcp, &files)?;
                relay(device, twin_here)
            })
        };
        // The device writes everything before it reads: the twin's bytes wait meanwhile.
        let tcp = TcpStream::connect(&to).unwrap();
        super::super::configure(&tcp).unwrap();
        let mut dev = client(tcp, &to, &cross(&dev_files, &host_files)).unwrap();
        dev.write_all(&to_twin).unwrap();
        dev.flush().unwrap();
        let mut got = Vec::new();
        dev.read_to_end(&mut got)
            .expect("the relay ends with close_notify");
        assert!(got == to_device, "the device got {} other bytes", got.len());
        drop(dev);
        assert!(twin.join().unwrap() == to_twin, "the twin got other bytes");
        assert_eq!(
            host.join().unwrap().unwrap(),
            Relayed {
                to_local: 3 << 20,
                to_tls: 5 << 20
            }
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn only_a_tls_connection_is_relayed() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let err = relay(Transport::Plain(a), UnixStream::pair().unwrap().0).unwrap_err();
        assert!(err.to_string().contains("TLS"), "{err}");
    }
}
