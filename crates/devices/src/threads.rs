//! A hook each VMM thread of a known kind runs first thing: the jailed VMM sets it to install
//! that kind's seccomp filter (`jail::seccomp::threads`); unset (an unjailed VMM, the tests)
//! it does nothing. The device models only say which kind a thread is.
//!
//! A thread inherits the filters of the thread that creates it, so device workers (started
//! when the guest activates a device, i.e. on a vCPU thread) are not created by the thread
//! that asks for them: once the hook is set, [`spawn`] hands the thread to a spawner thread
//! (started with the hook, by the thread that sets it: the VMM's main thread, which has
//! only the process filter), so a worker carries the process filter and its own, never the
//! vCPU's. Workers started before the hook was set (a restored VM's active devices) narrow
//! themselves when it is set: they wait on [`hook_set_event`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The kinds of threads with their own hook call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread (`vmm::vcpu`).
    Vcpu,
    /// A device's queue worker ([`crate::virtio::worker`]).
    DeviceWorker,
    /// The API socket's accept and connection threads.
    Api,
    /// The VNC server's accept thread and each client's reader and writer.
    Display,
    /// The thread that writes the serial console's log file (`vmm::serial_log`).
    LogWriter,
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Readable once the hook is set (never read: it stays readable).
static HOOK_SET: OnceLock<EventFd> = OnceLock::new();

/// A thread to start: its name, its body, where to send its handle.
struct SpawnRequest {
    name: String,
    body: Box<dyn FnOnce() + Send>,
    reply: SyncSender<io::Result<JoinHandle<()>>>,
}

/// The spawner thread's queue, once the hook is set.
static SPAWNER: OnceLock<Mutex<Sender<SpawnRequest>>> = OnceLock::new();

/// The event workers started before the hook wait on to narrow themselves.
pub fn hook_set_event() -> io::Result<RawFd> {
    if let Some(e) = HOOK_SET.get() {
        return Ok(e.as_raw_fd());
    }
    let event = EventFd::new(EFD_NONBLOCK)?;
    // Another thread may have set it first; either one is the event.
    let _ = HOOK_SET.set(event);
    HOOK_SET
        .get()
        .map(AsRawFd::as_raw_fd)
        .ok_or_else(|| io::Error::other("the hook event is not set"))
}

/// Sets the hook (once per process) and starts the spawner thread from the calling thread
/// (call it from the thread whose filters the spawned threads may inherit: the main
/// thread); false if one was set already.
pub fn set_start_hook(hook: fn(ThreadKind)) -> io::Result<bool> {
    let (requests, rx) = channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            for r in rx {
                let spawned = std::thread::Builder::new().name(r.name).spawn(r.body);
                let _ = r.reply.send(spawned);
            }
        })?;
    if SPAWNER.set(Mutex::new(requests)).is_err() || HOOK.set(hook).is_err() {
        return Ok(false);
    }
    hook_set_event()?;
    if let Some(e) = HOOK_SET.get() {
        e.write(1)?;
    }
    Ok(true)
}

/// Called by a new thread of `kind` before it does anything else; true if the hook ran
/// (false: no hook yet).
pub fn started(kind: ThreadKind) -> bool {
    match HOOK.get() {
        Some(hook) => {
            hook(kind);
            true
        }
        None => false,
    }
}

/// Set in a process whose threads must all start after it drops its privileges (a jailed
/// VMM: capabilities and the bounding set are each thread's own).
static STARTS_LATE: AtomicBool = AtomicBool::new(false);

/// Makes this process start its threads only when they are needed: a jailed VMM calls it
/// first, since a thread started before the privileges are dropped would keep its bounding
/// set of capabilities. [`start_standby`] then starts none, and [`may_start_early`] says no.
pub fn start_threads_late() {
    STARTS_LATE.store(true, Ordering::Release);
}

/// Whether threads may be started ahead of need in this process (see
/// [`start_threads_late`]).
pub fn may_start_early() -> bool {
    !STARTS_LATE.load(Ordering::Acquire)
}

/// A body for a thread on standby, and the name it runs under.
type Job = (String, Box<dyn FnOnce() + Send>);

/// A thread started ahead of need, waiting for the one body it will run.
struct Standby {
    handle: JoinHandle<()>,
    job: SyncSender<Job>,
}

/// The threads on standby, taken by [`spawn`] first come first served.
static STANDBY: Mutex<Vec<Standby>> = Mutex::new(Vec::new());

/// Starts `n` threads on standby, which the next calls of [`spawn`] (in this process) run
/// their bodies on instead of creating threads then. A migration's destination starts them
/// while the pages arrive: a thread created on a busy host starts a time slice (milliseconds)
/// behind the running ones, while a sleeping one that is woken runs at once. Called from the
/// thread whose filters they may inherit (as [`set_start_hook`]); each body still narrows
/// itself with [`started`]. [`StandbyGuard`] ends the ones left unused.
pub fn start_standby(n: usize) -> io::Result<StandbyGuard> {
    let n = if may_start_early() { n } else { 0 };
    let mut started = Vec::with_capacity(n);
    for _ in 0..n {
        let (job, rx) = sync_channel::<Job>(1);
        let handle = std::thread::Builder::new()
            .name("standby".into())
            .spawn(move || {
                if let Ok((name, body)) = rx.recv() {
                    name_this_thread(&name);
                    body();
                }
            })?;
        started.push(Standby { handle, job });
    }
    STANDBY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(started);
    Ok(StandbyGuard(()))
}

/// Ends the threads on standby that no [`spawn`] took, when dropped (without waiting for
/// them: each ends as soon as it sees that no body will come).
pub struct StandbyGuard(());

impl Drop for StandbyGuard {
    fn drop(&mut self) {
        STANDBY.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Gives the calling thread `name` (as the kernel shows it: at most 15 bytes).
fn name_this_thread(name: &str) {
    let mut bytes: Vec<u8> = name.bytes().filter(|&b| b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, which `bytes`
    // is, and it outlives the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr()) };
}

/// Starts `body` on a thread named `name`: one on standby if there is one (see
/// [`start_standby`]); else a new one, created by the spawner thread once the hook is set
/// (so it does not inherit the caller's filters), by the caller before.
pub fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    let standby = STANDBY.lock().unwrap_or_else(|e| e.into_inner()).pop();
    if let Some(s) = standby {
        if s.job.send((name.to_string(), Box::new(body))).is_ok() {
            return Ok(s.handle);
        }
        return Err(io::Error::other("a thread on standby is gone"));
    }
    let Some(spawner) = SPAWNER.get() else {
        return std::thread::Builder::new()
            .name(name.to_string())
            .spawn(body);
    };
    let (reply, answer) = sync_channel(1);
    let request = SpawnRequest {
        name: name.to_string(),
        body: Box::new(body),
        reply,
    };
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(request)
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}
