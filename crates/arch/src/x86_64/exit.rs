//! The x86_64 part of the vCPU loop: port I/O exits go to the port bus.

use devices::bus::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};

/// Handles the exits only this architecture has (port I/O): a read of a port no device owns
/// returns all ones, a write to one is dropped. Returns the exit back when it is not one of
/// these, for the generic loop to handle. No allocation, no lock beyond the device's own.
#[inline]
pub fn handle_arch_exit<'a>(exit: VcpuExit<'a>, pio: &Bus) -> Option<VcpuExit<'a>> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
            None
        }
        other => Some(other),
    }
}

/// The guest instruction pointer of a stopped vCPU, for error messages.
pub fn instruction_pointer(vcpu: &VcpuFd) -> Option<u64> {
    vcpu.get_regs().ok().map(|r| r.rip)
}
