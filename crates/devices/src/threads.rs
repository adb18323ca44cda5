//! A hook each VMM thread of a known kind runs first thing: the jailed VMM sets it to install
//! that kind's seccomp filter (`jail::seccomp::threads`); unset (an unjailed VMM, the tests)
//! it does nothing. The device models only say which kind a thread is.

use std::sync::OnceLock;

/// The kinds of threads with their own hook call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread (`vmm::vcpu`).
    Vcpu,
    /// A device's queue worker ([`crate::virtio::worker`]).
    DeviceWorker,
    /// The API socket's accept and connection threads.
    Api,
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Sets the hook (once per process); false if one was set already.
pub fn set_start_hook(hook: fn(ThreadKind)) -> bool {
    HOOK.set(hook).is_ok()
}

/// Called by a new thread of `kind` before it does anything else.
pub fn started(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}
