//! The vCPU threads: run the guest, dispatch MMIO exits to the bus and architecture exits
//! (x86_64: port I/O) to the architecture's hook.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable};

use devices::bus::{lock, Bus};
use devices::legacy::{ExitSignal, GuestExit};

/// KVM_SYSTEM_EVENT_* types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// Installs the (empty) handler for the kick signal, so it interrupts KVM_RUN instead of killing.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop).map_err(std::io::Error::from)
}

/// What all vCPU threads share.
pub struct VcpuShared {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitSignal>,
    /// Set when the VM is stopping; vCPUs leave their loop.
    pub stop: AtomicBool,
    /// Set while the VM is paused: vCPUs leave KVM_RUN and park.
    pub pause: AtomicBool,
    /// How many vCPUs are parked.
    pub parked: Parked,
    /// The first vCPU error, if any.
    pub error: Mutex<Option<(u8, String)>>,
    /// Whether a port access no device takes whole is split into string I/O (firmware boots
    /// only, see `arch::handle_arch_exit`).
    pub split_string_io: bool,
}

impl VcpuShared {
    fn fail(&self, id: u8, reason: String) {
        let mut e = lock(&self.error);
        if e.is_none() {
            *e = Some((id, reason));
        }
        drop(e);
        let _ = self.exit.event.write(1);
    }
}

/// How many vCPUs are parked, and a wakeup for whoever waits for that number: a pause ends
/// as soon as the last vCPU parks, not at the next poll.
#[derive(Default)]
pub struct Parked {
    count: Mutex<usize>,
    changed: Condvar,
}

impl Parked {
    /// How many are parked now.
    pub fn get(&self) -> usize {
        *lock(&self.count)
    }

    fn change(&self, f: impl FnOnce(usize) -> usize) {
        let mut c = lock(&self.count);
        *c = f(*c);
        drop(c);
        self.changed.notify_all();
    }

    /// Waits at most `limit` for `done(count)`; whether it holds.
    pub fn wait_until(&self, limit: std::time::Duration, done: impl Fn(usize) -> bool) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut c = lock(&self.count);
        while !done(*c) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            c = match self.changed.wait_timeout(c, left) {
                Ok((c, _)) => c,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

/// What a parked vCPU thread is told.
pub enum VcpuMsg {
    /// Leave the parked state.
    Resume,
}

/// A running vCPU thread.
pub struct VcpuThread {
    pub handle: JoinHandle<()>,
    msgs: Sender<VcpuMsg>,
    /// The vCPU, held by its thread while the guest runs and let go while it is parked.
    fd: Arc<Mutex<VcpuFd>>,
}

/// Starts vCPU `id` on its own thread (one on standby if there is one:
/// [`devices::threads::start_standby`]).
pub fn spawn(id: u8, vcpu: VcpuFd, shared: Arc<VcpuShared>) -> std::io::Result<VcpuThread> {
    let (msgs, rx) = channel();
    let fd = Arc::new(Mutex::new(vcpu));
    let held = fd.clone();
    let handle =
        devices::threads::spawn(&format!("vcpu{id}"), move || run(id, &held, &shared, &rx))?;
    Ok(VcpuThread { handle, msgs, fd })
}

impl VcpuThread {
    /// Interrupts the thread's KVM_RUN (it then sees the stop and pause flags).
    pub fn kick(&self) {
        let _ = self.handle.kill(kick_signal());
    }

    /// Sends a message to the (parked) thread; false if the thread is gone.
    pub fn send(&self, msg: VcpuMsg) -> bool {
        self.msgs.send(msg).is_ok()
    }

    /// The vCPU, for its state ioctls on the calling thread: call it only while the VM is
    /// paused (the vCPU's thread holds it while the guest runs). Reading the state here
    /// rather than asking the parked thread saves two thread wake-ups, a few hundred
    /// microseconds of a migration's downtime on a loaded host.
    pub fn parked_fd(&self) -> std::sync::MutexGuard<'_, VcpuFd> {
        lock(&self.fd)
    }
}

/// Parks the vCPU until it is resumed or the VM stops, letting go of it meanwhile.
fn park(fd: &Mutex<VcpuFd>, shared: &VcpuShared, rx: &Receiver<VcpuMsg>) {
    {
        let mut vcpu = lock(fd);
        // Re-enter once with immediate_exit so KVM completes a pending port or MMIO read
        // before the state is looked at; KVM then returns EINTR without running the guest.
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
    }
    shared.parked.change(|n| n + 1);
    while !shared.stop.load(Ordering::Acquire) {
        match rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(VcpuMsg::Resume) if !shared.pause.load(Ordering::Acquire) => break,
            Ok(VcpuMsg::Resume) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    shared.parked.change(|n| n.saturating_sub(1));
}

fn run(id: u8, fd: &Mutex<VcpuFd>, shared: &VcpuShared, rx: &Receiver<VcpuMsg>) {
    let mut narrowed = devices::threads::started(devices::threads::ThreadKind::Vcpu);
    while !shared.stop.load(Ordering::Acquire) {
        if shared.pause.load(Ordering::Acquire) {
            park(fd, shared, rx);
            continue;
        }
        // Started parked before a jail's filters were set (a migration's destination):
        // narrowed before the guest runs.
        if !narrowed {
            narrowed = devices::threads::started(devices::threads::ThreadKind::Vcpu);
        }
        // Held while the guest runs; the next pause lets go of it in `park`.
        let mut vcpu = lock(fd);
        while !shared.stop.load(Ordering::Acquire) && !shared.pause.load(Ordering::Acquire) {
            match vcpu.run() {
                Ok(exit) => {
                    if let Some(stop) = handle_exit(id, exit, shared) {
                        match stop {
                            Ok(guest_exit) => shared.exit.exit(guest_exit),
                            Err(reason) => {
                                let at = arch::instruction_pointer(&vcpu)
                                    .map(|ip| format!(" (instruction pointer {ip:#x})"))
                                    .unwrap_or_default();
                                shared.fail(id, format!("{reason}{at}"));
                            }
                        }
                        return;
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    shared.fail(id, format!("KVM_RUN failed: {e}"));
                    return;
                }
            }
        }
    }
}

/// Handles one exit; `Some` ends the thread with a guest exit or an error.
fn handle_exit(id: u8, exit: VcpuExit, shared: &VcpuShared) -> Option<Result<GuestExit, String>> {
    // The architecture's exits first (x86_64: port I/O, the hottest path); it hands back the
    // ones it does not own.
    let exit = arch::handle_arch_exit(exit, &shared.pio, shared.split_string_io)?;
    match exit {
        VcpuExit::MmioRead(addr, data) => {
            if !shared.mmio.read(addr, data) {
                devices::guest_debug!("MMIO read at {addr:#x} ({} bytes): no device", data.len());
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !shared.mmio.write(addr, data) {
                devices::guest_debug!("MMIO write at {addr:#x} of {data:02x?}: no device");
            }
        }
        VcpuExit::Hlt => {
            devices::guest_debug!("vcpu{id}: hlt exit");
        }
        VcpuExit::Intr => {}
        VcpuExit::Shutdown => {
            return Some(Err("the guest triple-faulted (KVM_EXIT_SHUTDOWN)".into()));
        }
        VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN, _) => return Some(Ok(GuestExit::PowerOff)),
        VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, _) => return Some(Ok(GuestExit::Reset)),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(Err(format!("guest system event {kind}")));
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(Err(format!(
                "KVM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
            )));
        }
        VcpuExit::InternalError => {
            return Some(Err(
                "KVM internal error (an instruction KVM could not emulate)".into(),
            ));
        }
        other => {
            return Some(Err(format!("unexpected KVM exit {other:?}")));
        }
    }
    None
}
