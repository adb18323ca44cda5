//! The ACPI PM timer of a firmware-booted VM: a free-running 24-bit counter at 3.579545 MHz
//! at PM base + 8 (read-only). OVMF's timer library spins on it for every delay; the FADT of
//! a firmware boot names it for the guest kernel too.

use std::time::Instant;

use crate::bus::BusDevice;

/// The ACPI PM timer's frequency.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The counter is 24 bits wide (the FADT's `TMR_VAL_EXT` is clear).
const PM_TIMER_MASK: u64 = (1 << 24) - 1;

/// The counter, counting from when the device was made.
pub struct AcpiPmTimer {
    start: Instant,
}

impl AcpiPmTimer {
    /// A timer counting from now.
    pub fn new() -> Self {
        AcpiPmTimer {
            start: Instant::now(),
        }
    }

    /// The counter's value now.
    pub fn count(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * u128::from(PM_TIMER_HZ) / 1_000_000_000;
        // Masked to 24 bits, so it fits.
        u32::try_from(ticks & u128::from(PM_TIMER_MASK)).unwrap_or(0)
    }
}

impl Default for AcpiPmTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for AcpiPmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.count().to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at.and_then(|at| bytes.get(at).copied()).unwrap_or(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_runs_at_the_pm_timer_rate_within_24_bits() {
        let mut timer = AcpiPmTimer::new();
        let read = |t: &mut AcpiPmTimer| {
            let mut v = [0u8; 4];
            t.read(0, &mut v);
            u32::from_le_bytes(v)
        };
        let a = read(&mut timer);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let b = read(&mut timer);
        assert!(a < 1 << 24 && b < 1 << 24);
        // 100 ms is 357,954 ticks; allow a loaded machine's oversleep (and no wrap: 4.7 s).
        let ticks = b.wrapping_sub(a) & 0xff_ffff;
        assert!(
            (350_000..3_000_000).contains(&ticks),
            "{ticks} ticks in 100 ms"
        );
        let mut high = [0u8; 2];
        timer.read(3, &mut high);
        assert_eq!(
            high,
            [0, 0],
            "past the 24 bits and past the register: zeros"
        );
    }
}
