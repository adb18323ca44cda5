//! The Arm PrimeCell PL031 real-time clock (the RTC of arm64 guests, on the MMIO bus).
//!
//! A 32-bit count of seconds: the host's UTC time plus an offset the guest sets by writing
//! the load register (`hwclock --systohc`), so it is right after a restore. The match
//! register is kept but raises no interrupt (no alarms). Only aligned 32-bit accesses do
//! anything; other widths read as zero and are ignored, as are writes to read-only registers.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// Data register: the current count (read-only).
const RTCDR: u64 = 0x000;
/// Match register.
const RTCMR: u64 = 0x004;
/// Load register: writing sets the count.
const RTCLR: u64 = 0x008;
/// Control register: bit 0 starts the clock (it cannot be stopped once started).
const RTCCR: u64 = 0x00c;
/// Interrupt mask set/clear.
const RTCIMSC: u64 = 0x010;
/// Raw interrupt status (never set: no alarms).
const RTCRIS: u64 = 0x014;
/// Masked interrupt status.
const RTCMIS: u64 = 0x018;
/// The PrimeCell identification registers: peripheral id 0x00041031 (PL031, Arm), then the
/// PrimeCell id 0xB105F00D, one byte per 32-bit register.
const ID_START: u64 = 0xfe0;
const ID_BYTES: [u8; 8] = [0x31, 0x10, 0x04, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// Seconds since the Unix epoch, UTC.
pub type Clock = Box<dyn Fn() -> i64 + Send>;

/// What a snapshot keeps of the PL031: the guest's offset from the host's time and its
/// registers (the count itself is the host's time, so it is right after a restore).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pl031State {
    /// Seconds the guest's clock is ahead of the host's (negative: behind).
    pub offset: i64,
    /// The match register.
    pub match_value: u32,
    /// The last value written to the load register.
    pub load: u32,
    /// The interrupt mask.
    pub mask: u32,
}

/// The PL031 RTC.
pub struct Pl031 {
    state: Pl031State,
    now: Clock,
}

impl Default for Pl031 {
    fn default() -> Self {
        Self::new()
    }
}

impl Pl031 {
    /// An RTC reading the host's clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        }))
    }

    /// An RTC reading `now` (tests).
    pub fn with_clock(now: Clock) -> Self {
        Self {
            state: Pl031State::default(),
            now,
        }
    }

    /// The state a snapshot keeps.
    pub fn save_state(&self) -> Pl031State {
        self.state.clone()
    }

    /// Puts the RTC in `state` (every value is one the guest could have set).
    pub fn restore_state(&mut self, state: &Pl031State) {
        self.state = state.clone();
    }

    /// The count: the host's time plus the offset, modulo 2^32 as the register holds it.
    fn count(&self) -> u32 {
        let t = (self.now)().saturating_add(self.state.offset);
        // The register is 32 bits wide: it wraps (in 2106), like the hardware's counter.
        u32::try_from(t.rem_euclid(1 << 32)).unwrap_or(0)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            RTCDR => self.count(),
            RTCMR => self.state.match_value,
            RTCLR => self.state.load,
            RTCCR => 1,
            RTCIMSC => self.state.mask,
            RTCRIS | RTCMIS => 0,
            o if (ID_START..ID_START + 4 * 8).contains(&o) => {
                let index = usize::try_from((o - ID_START) / 4).unwrap_or(0);
                u32::from(ID_BYTES[index])
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            RTCMR => self.state.match_value = value,
            RTCLR => {
                self.state.load = value;
                self.state.offset = i64::from(value) - (self.now)();
            }
            RTCIMSC => self.state.mask = value & 1,
            // Starting a running clock (RTCCR), clearing interrupts that never fire (RTCICR)
            // and writing read-only registers change nothing.
            _ => {}
        }
    }
}

impl BusDevice for Pl031 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    fn rtc_at(now: &Arc<AtomicI64>) -> Pl031 {
        let now = now.clone();
        Pl031::with_clock(Box::new(move || now.load(Ordering::Relaxed)))
    }

    fn read(rtc: &mut Pl031, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        rtc.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn the_count_is_the_host_time_until_the_guest_loads_another() {
        let now = Arc::new(AtomicI64::new(1_800_000_000));
        let mut rtc = rtc_at(&now);
        assert_eq!(read(&mut rtc, RTCDR), 1_800_000_000);
        assert_eq!(read(&mut rtc, RTCCR), 1, "the clock runs from the start");
        rtc.write(RTCLR, &1_000u32.to_le_bytes());
        now.fetch_add(5, Ordering::Relaxed);
        assert_eq!(read(&mut rtc, RTCDR), 1_005);
        assert_eq!(read(&mut rtc, RTCLR), 1_000);

        // A restored RTC keeps the guest's offset against the host's time then.
        let saved = rtc.save_state();
        let mut back = rtc_at(&now);
        back.restore_state(&saved);
        now.fetch_add(60, Ordering::Relaxed);
        assert_eq!(read(&mut back, RTCDR), 1_065);
    }

    #[test]
    fn identifies_as_a_pl031_primecell_and_ignores_odd_accesses() {
        let mut rtc = rtc_at(&Arc::new(AtomicI64::new(7)));
        let id: Vec<u32> = (0..8).map(|i| read(&mut rtc, ID_START + 4 * i)).collect();
        assert_eq!(id, [0x31, 0x10, 0x04, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
        let mut half = [0xffu8; 2];
        rtc.read(RTCDR, &mut half);
        assert_eq!(half, [0, 0]);
        rtc.write(RTCLR + 1, &[1, 2, 3, 4]);
        rtc.write(RTCLR, &[1, 2]);
        rtc.write(RTCDR, &99u32.to_le_bytes());
        rtc.write(RTCRIS, &1u32.to_le_bytes());
        assert_eq!(read(&mut rtc, RTCDR), 7);
        assert_eq!(read(&mut rtc, RTCRIS), 0);
        assert_eq!(read(&mut rtc, 0x020), 0, "no register there");
    }
}
