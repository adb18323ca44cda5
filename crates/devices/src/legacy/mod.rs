//! Legacy platform devices: the 16550 serial port, i8042 reset, the CMOS real-time clock (x86_64)
//! and the PL031 real-time clock (aarch64), the ACPI
//! power-off and debug-exit ports, a sink for ports that only take writes (POST code port 0x80), and
//! the firmware configuration device ([`FwCfg`]) firmware-booted guests read.

mod cmos;
mod debugcon;
pub mod fw_cfg;
mod i8042;
mod pl031;
mod pm_timer;
mod power;
mod serial;

pub use cmos::{Cmos, CmosState, CmosStateError};
pub use debugcon::DebugCon;
pub use fw_cfg::{FwCfg, FwCfgError, FwCfgState};
pub use i8042::I8042;
pub use pl031::{Pl031, Pl031State};
pub use pm_timer::{AcpiPmTimer, PM_TIMER_HZ};
pub use power::{AcpiPm, DebugExit, PortSink};
pub use serial::{
    EventFdTrigger, InputCounters, InputOutcome, Serial, SerialControlError, SerialState,
    SerialStateError, INPUT_CAP, INPUT_REQUEST_MAX,
};

use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// Why the guest asked the VM to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// ACPI S5 power-off.
    PowerOff,
    /// Reset through the i8042 or a triple fault.
    Reset,
    /// A write of this value to the debug-exit port.
    DebugExit(u32),
}

impl GuestExit {
    /// The process exit status this guest exit maps to.
    pub fn status(self) -> i32 {
        match self {
            GuestExit::PowerOff => 0,
            GuestExit::Reset => 0,
            GuestExit::DebugExit(v) => (v & 0xff) as i32,
        }
    }
}

/// Shared between the devices that end the VM and the thread waiting for that: the first exit
/// recorded wins, and `event` wakes the waiter.
pub struct ExitSignal {
    /// Becomes readable when an exit is recorded.
    pub event: EventFd,
    reason: Mutex<Option<GuestExit>>,
}

impl ExitSignal {
    /// A new signal with no exit recorded.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Records `exit` unless one is already recorded, and wakes the waiter.
    pub fn exit(&self, exit: GuestExit) {
        let mut reason = crate::bus::lock(&self.reason);
        if reason.is_none() {
            *reason = Some(exit);
        }
        // A failed write means the counter is saturated: the waiter is already woken.
        let _ = self.event.write(1);
    }

    /// The recorded exit, if any.
    pub fn reason(&self) -> Option<GuestExit> {
        *crate::bus::lock(&self.reason)
    }
}
