//! `pocketvisor vsock`: a stream to a guest's vsock port through its VMM's vsock unix socket
//! (the `CONNECT <port>\n` / `OK <host port>\n` handshake), with stdin sent to the guest and
//! the guest's bytes written to stdout: a client for scripts and hosts without `socat`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

/// The longest handshake answer read (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;
/// How long one handshake may take before the attempt counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts with --wait.
const RETRY: Duration = Duration::from_millis(250);

/// Connect to a guest's vsock port through its VMM.
#[derive(Args, Debug)]
#[command(after_help = "\
The VM must have been started with --vsock cid=N,socket=PATH; PATH is --vsock-socket here.
Once the guest accepts the connection, stdin goes to the guest (its end reads end-of-file when
stdin ends) and what the guest sends is written to stdout, until the guest closes its end.
A guest that is not listening (yet) refuses the connection: --wait retries until it listens.

EXAMPLE:
  echo '{\"op\":\"health\"}' | pocketvisor vsock --vsock-socket /tmp/v.sock --port 1025 --wait 30")]
pub struct VsockArgs {
    /// The VMM's vsock unix socket (`run --vsock cid=N,socket=PATH`).
    #[arg(long, value_name = "PATH")]
    vsock_socket: PathBuf,
    /// The guest's port.
    #[arg(long, value_name = "PORT")]
    port: u32,
    /// Retry for up to SECS while the guest refuses the connection (or the socket is not
    /// there yet).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    wait: u64,
}

/// Connects and completes the handshake once.
fn connect_once(socket: &Path, port: u32) -> Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to the VMM's vsock at {}", socket.display()))?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the newline is the guest's and must not be read here.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.last() != Some(&b'\n') {
        match stream.read(&mut byte) {
            Ok(0) => bail!("guest port {port} refused the connection (is anything listening?)"),
            Ok(_) => reply.push(byte[0]),
            Err(e) => return Err(e).context("no answer to CONNECT from the VMM"),
        }
        if reply.len() > MAX_REPLY {
            bail!("the VMM's answer to CONNECT is too long");
        }
    }
    let text = String::from_utf8_lossy(&reply);
    if !text.starts_with("OK ") {
        bail!("the VMM answered CONNECT with {:?}", text.trim_end());
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// `pocketvisor vsock`.
pub fn main(a: VsockArgs) -> Result<i32> {
    let deadline = Instant::now() + Duration::from_secs(a.wait);
    let stream = loop {
        match connect_once(&a.vsock_socket, a.port) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("vsock: {e:#}; retrying");
                std::thread::sleep(RETRY);
            }
            Err(e) => return Err(e),
        }
    };
    let mut to_guest = stream.try_clone()?;
    // stdin to the guest on its own thread; the guest's end sees end-of-file when stdin ends.
    std::thread::Builder::new()
        .name("vsock-stdin".into())
        .spawn(move || {
            if let Err(e) = io::copy(&mut io::stdin().lock(), &mut to_guest) {
                tracing::warn!("vsock: sending stdin to the guest: {e}");
            }
            let _ = to_guest.shutdown(Shutdown::Write);
        })
        .context("cannot start the stdin thread")?;
    let mut from_guest = stream;
    let mut out = io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from_guest.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading from the guest"),
        };
        match out.write_all(&buf[..n]).and_then(|()| out.flush()) {
            Ok(()) => {}
            // Nobody reads any more: the rest is not wanted.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e).context("writing to stdout"),
        }
    }
    // The guest closed its end: done, whether or not stdin has ended.
    Ok(0)
}
