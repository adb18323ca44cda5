//! pocketvisor-agent: the Linux guest end of the handset's cross-profile channels.
//!
//! Listens on vsock port 1025 (any CID) and answers newline-delimited JSON requests (see
//! `proto`). State lives under `/var/lib/pocketvisor-agent/` (`clipboard`, `clipboard.mime`,
//! `inbox/`, and `twin`: the original profile's name once the handset said this guest is a
//! clone of it). `--unix PATH` listens on a unix socket instead (for tests on a host).

mod proto;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Connections served at once.
const MAX_CONNS: usize = 8;
/// `AF_VSOCK` (40) in the type of `sockaddr_vm::svm_family`; the constant fits.
#[allow(clippy::cast_possible_truncation)]
const VSOCK_FAMILY: libc::sa_family_t = libc::AF_VSOCK as libc::sa_family_t;
/// The size of `sockaddr_vm` (16 bytes) as bind(2) takes it; the constant fits.
#[allow(clippy::cast_possible_truncation)]
const SOCKADDR_VM_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

struct Options {
    port: u32,
    dir: PathBuf,
    unix: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: pocketvisor-agent [--port N] [--dir DIR] [--unix PATH]\n\
         Serves the handset's clipboard and file channels on vsock port N (default 1025),\n\
         keeping state in DIR (default /var/lib/pocketvisor-agent)."
    );
    std::process::exit(2)
}

fn options() -> Options {
    let mut o = Options {
        port: 1025,
        dir: PathBuf::from("/var/lib/pocketvisor-agent"),
        unix: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--port" => o.port = value().parse().unwrap_or_else(|_| usage()),
            "--dir" => o.dir = value().into(),
            "--unix" => o.unix = Some(value().into()),
            _ => usage(),
        }
    }
    o
}

/// A listening AF_VSOCK stream socket on `port`, any CID.
fn vsock_listen(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = VSOCK_FAMILY;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm and its size is passed; the kernel only reads it.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            SOCKADDR_VM_LEN,
        )
    };
    // SAFETY: listen(2) on our socket.
    if r != 0 || unsafe { libc::listen(sock.as_raw_fd(), 16) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

/// Accepts one connection on a listening socket.
fn accept(listener: &OwnedFd) -> std::io::Result<File> {
    loop {
        // SAFETY: accept4(2) on our listening socket; no address is asked for.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` is a new descriptor nobody else owns.
            return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Serves one connection: request lines in, answer lines out, until EOF.
fn serve<S: Read + Write>(agent: &proto::Agent, stream: S) -> std::io::Result<()> {
    let mut r = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = (&mut r)
            .take(proto::LINE_MAX as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let answer = if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            agent.handle_line(&line)
        } else if line.len() > proto::LINE_MAX {
            // Drop the rest of the overlong line.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                let n = (&mut r).take(1 << 20).read_until(b'\n', &mut rest)?;
                if n == 0 || rest.last() == Some(&b'\n') {
                    break;
                }
            }
            proto::Agent::line_too_long()
        } else {
            return Ok(()); // EOF inside a line
        };
        let out = r.get_mut();
        out.write_all(&answer)?;
        out.write_all(b"\n")?;
        out.flush()?;
    }
}

fn spawn_conn<S: Read + Write + Send + 'static>(
    agent: &proto::Agent,
    active: &Arc<AtomicUsize>,
    stream: S,
) {
    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNS {
        active.fetch_sub(1, Ordering::SeqCst);
        return; // dropped: closes the connection
    }
    let agent = agent.clone();
    let active = active.clone();
    std::thread::spawn(move || {
        if let Err(e) = serve(&agent, stream) {
            eprintln!("pocketvisor-agent: connection: {e}");
        }
        active.fetch_sub(1, Ordering::SeqCst);
    });
}

fn main() {
    let o = options();
    let agent = proto::Agent::new(&o.dir);
    let active = Arc::new(AtomicUsize::new(0));
    if let Some(path) = &o.unix {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path).unwrap_or_else(|e| {
            eprintln!(
                "pocketvisor-agent: cannot listen on {}: {e}",
                path.display()
            );
            std::process::exit(1)
        });
        println!("pocketvisor-agent listening on {}", path.display());
        for s in l.incoming() {
            match s {
                Ok(s) => spawn_conn(&agent, &active, s),
                Err(e) => eprintln!("pocketvisor-agent: accept: {e}"),
            }
        }
        return;
    }
    let l = vsock_listen(o.port).unwrap_or_else(|e| {
        eprintln!(
            "pocketvisor-agent: cannot listen on vsock port {}: {e}",
            o.port
        );
        std::process::exit(1)
    });
    println!("pocketvisor-agent listening on vsock port {}", o.port);
    loop {
        match accept(&l) {
            Ok(s) => spawn_conn(&agent, &active, s),
            Err(e) => {
                eprintln!("pocketvisor-agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
