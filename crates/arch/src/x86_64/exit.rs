//! The x86_64 part of the vCPU loop: port I/O exits go to the port bus.

use devices::bus::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};

/// Handles the exits only this architecture has (port I/O): a read of a port no device owns
/// returns all ones, a write to one is dropped. Returns the exit back when it is not one of
/// these, for the generic loop to handle. No allocation, no lock beyond the device's own.
/// With `split_string_io` (firmware boots only: SeaBIOS reads fw_cfg with `rep insb`), an
/// access no device takes whole is retried as string I/O of narrower units.
#[inline]
pub fn handle_arch_exit<'a>(
    exit: VcpuExit<'a>,
    pio: &Bus,
    split_string_io: bool,
) -> Option<VcpuExit<'a>> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            let taken =
                pio.read(u64::from(port), data) || (split_string_io && string_in(pio, port, data));
            if !taken {
                devices::guest_debug!("port {port:#x} read ({} bytes): no device", data.len());
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            let taken = pio.write(u64::from(port), data)
                || (split_string_io && string_out(pio, port, data));
            if !taken {
                devices::guest_debug!("port {port:#x} write of {data:02x?}: no device");
            }
            None
        }
        other => Some(other),
    }
}

/// For an access of `len` bytes no device at `port` takes whole: the widest narrower access
/// (4, 2 or 1 bytes) that divides `len` and that one takes. String I/O (`rep insb` and
/// friends) arrives as one exit of `count * size` bytes without saying `size`: a `rep insb`
/// of 4 bytes from a 1-byte port looks like an `inl`, and must read 4 bytes in turn.
fn string_width(pio: &Bus, port: u16, len: usize) -> Option<usize> {
    [4usize, 2, 1]
        .into_iter()
        .find(|&w| w < len && len.is_multiple_of(w) && pio.covers(u64::from(port), w))
}

/// String input: the buffer filled one access at a time; false if no device takes it.
fn string_in(pio: &Bus, port: u16, data: &mut [u8]) -> bool {
    let Some(w) = string_width(pio, port, data.len()) else {
        return false;
    };
    data.chunks_mut(w)
        .all(|chunk| pio.read(u64::from(port), chunk))
}

/// String output: the buffer written one access at a time; false if no device takes it.
fn string_out(pio: &Bus, port: u16, data: &[u8]) -> bool {
    let Some(w) = string_width(pio, port, data.len()) else {
        return false;
    };
    for chunk in data.chunks(w) {
        pio.write(u64::from(port), chunk);
    }
    true
}

/// The guest instruction pointer of a stopped vCPU, for error messages.
pub fn instruction_pointer(vcpu: &VcpuFd) -> Option<u64> {
    vcpu.get_regs().ok().map(|r| r.rip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::legacy::FwCfg;
    use std::sync::{Arc, Mutex};

    fn fw_cfg_bus() -> Bus {
        let mut pio = Bus::new();
        pio.insert(0x510, 2, Arc::new(Mutex::new(FwCfg::new(1))))
            .unwrap();
        pio
    }

    #[test]
    fn string_input_reads_each_byte_of_a_one_byte_port() {
        let pio = fw_cfg_bus();
        let select = 0u16.to_le_bytes();
        assert!(handle_arch_exit(VcpuExit::IoOut(0x510, &select), &pio, true).is_none());
        // `rep insb` of 6 bytes at the data port: one exit, one byte per access.
        let mut buf = [0xaau8; 6];
        assert!(handle_arch_exit(VcpuExit::IoIn(0x511, &mut buf), &pio, true).is_none());
        assert_eq!(&buf, b"QEMU\0\0");
        // Four bytes look like an `inl` but are four bytes of the item too (the ID: no DMA).
        let select = 1u16.to_le_bytes();
        assert!(handle_arch_exit(VcpuExit::IoOut(0x510, &select), &pio, true).is_none());
        let mut id = [0xaau8; 4];
        assert!(handle_arch_exit(VcpuExit::IoIn(0x511, &mut id), &pio, true).is_none());
        assert_eq!(id, [1, 0, 0, 0]);
        // A port nobody owns still reads all ones, whatever the length.
        let mut none = [0u8; 8];
        assert!(handle_arch_exit(VcpuExit::IoIn(0x520, &mut none), &pio, true).is_none());
        assert_eq!(none, [0xff; 8]);
    }

    #[test]
    fn without_string_splitting_a_wide_access_to_a_narrow_port_reads_all_ones() {
        // Kernel boots: the port bus as it always was, a `rep insb` of a 1-byte port unread.
        let pio = fw_cfg_bus();
        let select = 0u16.to_le_bytes();
        assert!(handle_arch_exit(VcpuExit::IoOut(0x510, &select), &pio, false).is_none());
        let mut buf = [0xaau8; 6];
        assert!(handle_arch_exit(VcpuExit::IoIn(0x511, &mut buf), &pio, false).is_none());
        assert_eq!(buf, [0xff; 6]);
        // The write of 4 bytes to the 1-byte port was dropped: the selector still says 0.
        assert!(handle_arch_exit(VcpuExit::IoOut(0x511, &[1, 2, 3, 4]), &pio, false).is_none());
        let mut sig = [0u8; 1];
        assert!(handle_arch_exit(VcpuExit::IoIn(0x511, &mut sig), &pio, false).is_none());
        assert_eq!(sig, *b"Q");
    }
}
