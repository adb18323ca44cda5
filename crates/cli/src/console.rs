//! `pocketvisor profile console NAME`: the guest's serial console through the daemon, like
//! `virsh console`.
//!
//! The daemon's `GET /v1/profiles/{name}/console` switches the connection to a byte stream
//! (see `handset::console`). On a terminal, stdin is put in raw mode (every key, Ctrl-C
//! included, goes to the guest) and Ctrl-] detaches; the terminal is restored on every way
//! out (detach, the guest stopping, an error, a panic, SIGTERM/SIGHUP/SIGINT/SIGQUIT). With
//! stdin not a terminal (a script), its bytes are sent as they are and, at its end, the
//! console waits until the guest has printed nothing for `--drain-ms` (or at most
//! `--drain-max-ms`, for a guest that never stops printing), then exits.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use handset::client::Client;

/// The escape key: Ctrl-] (as virsh and telnet).
pub const ESCAPE: u8 = 0x1d;

/// After the end of a script's input: how long the guest must stay quiet, and the longest
/// wait in all.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// The quiet time that ends the console.
    pub quiet: Duration,
    /// The longest the console stays after the end of input.
    pub max: Duration,
}

/// How a console session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The user pressed the escape key.
    Detached,
    /// The daemon ended the session (the VMM ended, or the daemon stops).
    Remote,
    /// Stdin ended and the guest then stayed quiet for the drain time (or the longest drain
    /// passed).
    Drained,
}

/// The terminal's settings before raw mode, for the signal handler.
static SAVED: OnceLock<libc::termios> = OnceLock::new();

/// Raw mode on a terminal; the saved settings come back when this is dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: i32) -> std::io::Result<RawMode> {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _ = SAVED.set(saved);
        install_restoring_handlers();
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing: a guest line ending in "\n" alone still starts at column 0.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: `raw` is a valid termios for a valid fd.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: `saved` came from tcgetattr on this fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

extern "C" fn restore_and_reraise(sig: libc::c_int) {
    if let Some(saved) = SAVED.get() {
        // SAFETY: tcsetattr is async-signal-safe; `saved` is a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
    }
    // SAFETY: restoring the default action and raising the signal again ends the process as
    // the signal would have; both are async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Signals that would end the process in raw mode restore the terminal first.
fn install_restoring_handlers() {
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: the handler only calls async-signal-safe functions.
        unsafe {
            libc::signal(
                sig,
                restore_and_reraise as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

fn is_terminal(fd: i32) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

/// Waits until `fds` (with `None` skipped) has a readable entry or `timeout` passes;
/// returns which are readable (or hung up).
fn poll(fds: &[Option<i32>], timeout: Option<Duration>) -> std::io::Result<Vec<bool>> {
    let mut raw: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    loop {
        // SAFETY: `raw` is a valid array of `raw.len()` pollfds (negative fds are ignored).
        let r = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, ms) };
        if r >= 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(raw.iter().map(|p| p.revents != 0).collect())
}

/// Attaches to profile `name`'s console until detach, the guest's end or (without a
/// terminal) the end of stdin and the `drain`. Returns the exit status.
pub fn attach(c: &Client, name: &str, history: u64, drain: Drain) -> Result<i32> {
    handset::spec::check_name("profile name", name)?;
    let path = format!("/v1/profiles/{name}/console?history={history}");
    let (sock, early) = c.upgrade(&path, handset::console::PROTOCOL)?;
    let tty = is_terminal(0);
    let mut out = std::io::stdout().lock();
    let end = {
        let _raw = if tty {
            let raw = RawMode::enter(0).context("cannot put the terminal in raw mode")?;
            // Announced once the terminal is raw: from here every key goes to the guest.
            eprint!("Connected to profile {name} (escape character is ^])\r\n");
            Some(raw)
        } else {
            None
        };
        out.write_all(&early)?;
        out.flush()?;
        pump(&sock, &mut out, tty, drain)?
    };
    match end {
        End::Detached => eprintln!("\nDetached from profile {name}."),
        End::Drained => {}
        End::Remote => {
            let none: Option<&()> = None;
            let state = c
                .call::<handset::ProfileInfo>("GET", &format!("/v1/profiles/{name}"), none)
                .map(|p| p.state.as_str().to_string())
                .unwrap_or_else(|e| format!("unknown ({e})"));
            eprintln!("\nThe console of profile {name} closed: the profile is {state}.");
        }
    }
    Ok(0)
}

/// Copies the socket to `out` and stdin to the socket until the session ends.
fn pump(sock: &UnixStream, out: &mut impl Write, tty: bool, drain: Drain) -> Result<End> {
    let stdin_fd = std::io::stdin().as_raw_fd();
    let mut stdin_open = true;
    let mut quiet_since = Instant::now();
    let mut input_end = Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        let timeout = (!stdin_open).then(|| {
            let quiet = drain.quiet.saturating_sub(quiet_since.elapsed());
            quiet.min(drain.max.saturating_sub(input_end.elapsed()))
        });
        if timeout.is_some_and(|t| t.is_zero()) {
            return Ok(End::Drained);
        }
        let ready = poll(
            &[Some(sock.as_raw_fd()), stdin_open.then_some(stdin_fd)],
            timeout,
        )
        .context("poll")?;
        if ready[0] {
            let n = (&*sock).read(&mut buf).unwrap_or(0);
            if n == 0 {
                return Ok(End::Remote);
            }
            out.write_all(&buf[..n])?;
            out.flush()?;
            quiet_since = Instant::now();
        }
        if stdin_open && ready[1] {
            // SAFETY: reads into `buf`, a valid buffer of `buf.len()` bytes.
            let n = unsafe { libc::read(stdin_fd, buf.as_mut_ptr().cast(), buf.len()) };
            let n = match usize::try_from(n) {
                Ok(n) => n,
                Err(_)
                    if std::io::Error::last_os_error().kind()
                        == std::io::ErrorKind::Interrupted =>
                {
                    continue
                }
                Err(_) => 0,
            };
            if n == 0 {
                stdin_open = false;
                quiet_since = Instant::now();
                input_end = Instant::now();
                continue;
            }
            let typed = &buf[..n];
            let (send, detach) = match typed.iter().position(|&b| tty && b == ESCAPE) {
                Some(i) => (&typed[..i], true),
                None => (typed, false),
            };
            if (&*sock).write_all(send).is_err() {
                return Ok(End::Remote);
            }
            if detach {
                return Ok(End::Detached);
            }
        }
    }
}
