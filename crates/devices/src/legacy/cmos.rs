//! The MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data).
//!
//! The clock reads the host's UTC time plus an offset the guest sets by writing the time
//! registers (`hwclock --systohc`). Update-in-progress never shows (the time is computed on
//! every read), the data mode (BCD or binary) and the 12/24-hour format follow status
//! register B, and the other bytes are plain battery-backed RAM. No alarm or periodic
//! interrupts. Every index the guest writes is masked to the 128 bytes there are.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Status B: binary (not BCD) data mode.
const B_BINARY: u8 = 0x04;
/// Status B: 24-hour format.
const B_24H: u8 = 0x02;
/// Status D: the RAM and time are valid (battery good).
const D_VALID: u8 = 0x80;
/// Status A as firmware leaves it: 32.768 kHz time base, 1024 Hz rate, no update in progress.
const A_DEFAULT: u8 = 0x26;
/// The hour register's PM flag in 12-hour format.
const PM: u8 = 0x80;
/// The index port's NMI-disable bit, not part of the index.
const INDEX_MASK: u8 = 0x7f;

/// Seconds since the Unix epoch, UTC.
pub type Clock = Box<dyn Fn() -> i64 + Send>;

/// What a snapshot keeps of the RTC: its RAM, the selected index and the guest's offset
/// from the host's time (the time itself is the host's, so it is right after a restore).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    /// The 128 bytes of RAM (status registers included).
    pub ram: Vec<u8>,
    /// The index last written to port 0x70.
    pub index: u8,
    /// Seconds the guest's clock is ahead of the host's (negative: behind).
    pub offset: i64,
}

/// Why a saved RTC state was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid CMOS RTC state: {0}")]
pub struct CmosStateError(String);

/// CMOS RAM: base memory in KiB (u16).
const CMOS_BASE_MEMORY: usize = 0x15;
/// CMOS RAM: memory above 1 MiB in KiB, up to 64 MiB (u16).
const CMOS_EXTENDED_MEMORY: usize = 0x17;
/// CMOS RAM: the same, as POST reports it (u16).
const CMOS_EXTENDED_MEMORY_2: usize = 0x30;
/// CMOS RAM: memory above 16 MiB below 4 GiB in 64 KiB units (u16).
const CMOS_MEMORY_ABOVE_16M: usize = 0x34;
/// CMOS RAM: memory above 4 GiB in 64 KiB units (24 bits).
const CMOS_MEMORY_ABOVE_4G: usize = 0x5b;
/// CMOS RAM: the number of vCPUs less one.
const CMOS_SMP_COUNT: usize = 0x5f;

/// The CMOS RTC and its RAM.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// Seconds added to the host's time (set by the guest writing the time registers).
    offset: i64,
    now: Clock,
}

impl Cmos {
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
        let mut ram = [0u8; 128];
        ram[usize::from(STATUS_A)] = A_DEFAULT;
        ram[usize::from(STATUS_B)] = B_24H;
        ram[usize::from(STATUS_D)] = D_VALID;
        Self {
            index: 0,
            ram,
            offset: 0,
            now,
        }
    }

    /// Writes the machine description PC firmware reads from CMOS RAM (the bytes QEMU's `pc`
    /// machine sets): base memory (640 KiB), memory between 1 and 64 MiB in KiB, memory
    /// between 16 MiB and `low_end` in 64 KiB units, `high` bytes above 4 GiB in 64 KiB
    /// units, and the vCPU count less one. Counts too large for their bytes saturate.
    pub fn set_machine_info(&mut self, low_end: u64, high: u64, nr_vcpus: u8) {
        const MIB: u64 = 1 << 20;
        let mut set16 = |reg: usize, v: u64| {
            let v = u16::try_from(v).unwrap_or(u16::MAX).to_le_bytes();
            self.ram[reg] = v[0];
            self.ram[reg + 1] = v[1];
        };
        set16(CMOS_BASE_MEMORY, 640);
        let extended = low_end.saturating_sub(MIB).min(63 * MIB) >> 10;
        set16(CMOS_EXTENDED_MEMORY, extended);
        set16(CMOS_EXTENDED_MEMORY_2, extended);
        set16(
            CMOS_MEMORY_ABOVE_16M,
            low_end.saturating_sub(16 * MIB) >> 16,
        );
        let above_4g = (high >> 16).min(0xff_ffff).to_le_bytes();
        self.ram[CMOS_MEMORY_ABOVE_4G..CMOS_MEMORY_ABOVE_4G + 3].copy_from_slice(&above_4g[..3]);
        self.ram[CMOS_SMP_COUNT] = nr_vcpus.saturating_sub(1);
    }

    /// The state a snapshot keeps.
    pub fn save_state(&self) -> CmosState {
        CmosState {
            ram: self.ram.to_vec(),
            index: self.index,
            offset: self.offset,
        }
    }

    /// Puts the RTC in `state`; on error nothing changes.
    pub fn restore_state(&mut self, state: &CmosState) -> Result<(), CmosStateError> {
        let ram: [u8; 128] =
            state.ram.as_slice().try_into().map_err(|_| {
                CmosStateError(format!("{} bytes of RAM, not 128", state.ram.len()))
            })?;
        self.ram = ram;
        self.index = state.index & INDEX_MASK;
        self.offset = state.offset;
        Ok(())
    }

    fn binary(&self) -> bool {
        self.ram[usize::from(STATUS_B)] & B_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v >> 4).saturating_mul(10).saturating_add(v & 0x0f)
        }
    }

    fn time(&self) -> DateTime {
        DateTime::from_unix((self.now)().saturating_add(self.offset))
    }

    fn read_register(&self, reg: u8) -> u8 {
        let t = self.time();
        match reg {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode_hour(t.hour),
            WEEKDAY => self.encode(t.weekday),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(u8::try_from(t.year.rem_euclid(100)).unwrap_or(0)),
            CENTURY => self.encode(u8::try_from(t.year.div_euclid(100).clamp(0, 99)).unwrap_or(0)),
            // Reading C acknowledges interrupts; there are none.
            STATUS_C => 0,
            _ => self.ram[usize::from(reg & INDEX_MASK)],
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.ram[usize::from(STATUS_B)] & B_24H != 0 {
            return self.encode(hour);
        }
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | if hour >= 12 { PM } else { 0 }
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.ram[usize::from(STATUS_B)] & B_24H != 0 {
            return self.decode(v);
        }
        let h = self.decode(v & !PM) % 12;
        if v & PM != 0 {
            h + 12
        } else {
            h
        }
    }

    fn write_register(&mut self, reg: u8, v: u8) {
        let mut t = self.time();
        match reg {
            SECONDS => t.second = self.decode(v).min(59),
            MINUTES => t.minute = self.decode(v).min(59),
            HOURS => t.hour = self.decode_hour(v).min(23),
            DAY => t.day = self.decode(v).clamp(1, 31),
            MONTH => t.month = self.decode(v).clamp(1, 12),
            YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(self.decode(v).min(99)),
            CENTURY => t.year = i64::from(self.decode(v).min(99)) * 100 + t.year.rem_euclid(100),
            // The weekday follows from the date; C and D are read-only.
            WEEKDAY | STATUS_C | STATUS_D => return,
            // Update-in-progress is not writable.
            STATUS_A => {
                self.ram[usize::from(STATUS_A)] = v & 0x7f;
                return;
            }
            _ => {
                self.ram[usize::from(reg & INDEX_MASK)] = v;
                return;
            }
        }
        self.offset = t.to_unix().saturating_sub((self.now)());
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            1 => self.read_register(self.index),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => self.index = v & INDEX_MASK,
            1 => self.write_register(self.index, v),
            _ => {}
        }
    }
}

/// A UTC calendar time (proleptic Gregorian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday ... 7 = Saturday, as the RTC counts.
    weekday: u8,
}

/// Narrows a value known to be in range (calendar fields) to a byte.
fn small(v: i64) -> u8 {
    u8::try_from(v).unwrap_or(0)
}

impl DateTime {
    fn from_unix(secs: i64) -> DateTime {
        let days = secs.div_euclid(86_400);
        let in_day = secs.rem_euclid(86_400);
        // Civil date from days since 1970-01-01 (eras of 400 years, March-based years).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        DateTime {
            year,
            month: small(month),
            day: small(day),
            hour: small(in_day / 3600),
            minute: small(in_day % 3600 / 60),
            second: small(in_day % 60),
            // 1970-01-01 was a Thursday (5).
            weekday: small((days + 4).rem_euclid(7) + 1),
        }
    }

    fn to_unix(self) -> i64 {
        let (month, day) = (i64::from(self.month), i64::from(self.day));
        let year = self.year - i64::from(month <= 2);
        let era = year.div_euclid(400);
        let yoe = year.rem_euclid(400);
        let mp = if month > 2 { month - 3 } else { month + 9 };
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    /// 2026-12-04 11:22:33 UTC, a Friday.
    const T: i64 = 1_796_383_353;

    fn rtc_at(t: i64) -> (Cmos, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(t));
        let clock = now.clone();
        (
            Cmos::with_clock(Box::new(move || clock.load(Ordering::Relaxed))),
            now,
        )
    }

    fn reg(rtc: &mut Cmos, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut v = [0u8];
        rtc.read(1, &mut v);
        v[0]
    }

    fn set(rtc: &mut Cmos, index: u8, v: u8) {
        rtc.write(0, &[index]);
        rtc.write(1, &[v]);
    }

    #[test]
    fn a_restored_rtc_keeps_the_guests_offset_and_ram_on_the_new_hosts_time() {
        let (mut rtc, _) = rtc_at(T);
        set(&mut rtc, STATUS_B, B_24H | B_BINARY);
        set(&mut rtc, HOURS, 15); // the guest sets its clock 4 h ahead (11 -> 15)
        set(&mut rtc, 0x40, 0xab);
        let state = rtc.save_state();
        // Restored an hour later on another RTC.
        let (mut back, _) = rtc_at(T + 3600);
        back.restore_state(&state).unwrap();
        assert_eq!(reg(&mut back, 0x40), 0xab);
        assert_eq!(reg(&mut back, HOURS), 16, "4 h ahead of the new time");
        assert_eq!(reg(&mut back, MINUTES), 22);

        let (mut fresh, _) = rtc_at(T);
        let before = fresh.save_state();
        let bad = CmosState {
            ram: vec![0; 12],
            ..state
        };
        assert!(fresh.restore_state(&bad).is_err());
        assert_eq!(
            fresh.save_state(),
            before,
            "a refused state changed the RTC"
        );
    }

    #[test]
    fn machine_info_lands_in_the_bytes_firmware_reads() {
        let mut rtc = Cmos::with_clock(Box::new(|| 0));
        rtc.set_machine_info(3 << 30, 5 << 30, 4);
        let byte = |rtc: &mut Cmos, r: u8| reg(rtc, r);
        assert_eq!((byte(&mut rtc, 0x15), byte(&mut rtc, 0x16)), (0x80, 0x02));
        // 63 MiB above 1 MiB, in KiB.
        assert_eq!((byte(&mut rtc, 0x30), byte(&mut rtc, 0x31)), (0x00, 0xfc));
        // (3 GiB - 16 MiB) / 64 KiB = 0xbf00.
        assert_eq!((byte(&mut rtc, 0x34), byte(&mut rtc, 0x35)), (0x00, 0xbf));
        // 5 GiB / 64 KiB = 0x014000.
        let high: Vec<u8> = (0x5b..=0x5d).map(|r| byte(&mut rtc, r)).collect();
        assert_eq!(high, [0x00, 0x40, 0x01]);
        assert_eq!(byte(&mut rtc, 0x5f), 3);
    }

    #[test]
    fn reads_the_host_time_in_bcd_24h_with_no_update_in_progress() {
        let (mut rtc, _) = rtc_at(T);
        let fields: Vec<u8> = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY]
            .iter()
            .map(|&r| reg(&mut rtc, r))
            .collect();
        assert_eq!(fields, [0x33, 0x22, 0x11, 6, 0x04, 0x12, 0x26, 0x20]);
        assert_eq!(reg(&mut rtc, STATUS_A) & 0x80, 0, "update in progress");
        assert_eq!(reg(&mut rtc, STATUS_D), D_VALID);
    }

    #[test]
    fn binary_and_12_hour_modes_follow_status_b() {
        let (mut rtc, _) = rtc_at(T + 2 * 3600); // 13:22:33
        set(&mut rtc, STATUS_B, B_BINARY);
        assert_eq!(reg(&mut rtc, MINUTES), 22);
        assert_eq!(reg(&mut rtc, HOURS), PM | 1);
        assert_eq!(reg(&mut rtc, YEAR), 26);
    }

    #[test]
    fn guest_writes_set_the_clock_and_it_keeps_running() {
        let (mut rtc, now) = rtc_at(T);
        set(&mut rtc, YEAR, 0x30);
        set(&mut rtc, HOURS, 0x08);
        now.fetch_add(10, Ordering::Relaxed);
        assert_eq!(reg(&mut rtc, YEAR), 0x30);
        assert_eq!(reg(&mut rtc, HOURS), 0x08);
        assert_eq!(reg(&mut rtc, SECONDS), 0x43);
    }

    #[test]
    fn ram_bytes_keep_what_is_written_and_indexes_are_masked() {
        let (mut rtc, _) = rtc_at(T);
        set(&mut rtc, 0x80 | 0x40, 0x5a); // NMI-disable bit set: index 0x40
        assert_eq!(reg(&mut rtc, 0x40), 0x5a);
        rtc.write(0, &[0xff]);
        let mut idx = [0u8; 2];
        rtc.read(0, &mut idx);
        assert_eq!(idx, [0x7f, 0]);
        // Odd accesses do not panic.
        rtc.write(1, &[]);
        rtc.read(7, &mut [0u8; 4]);
    }

    #[test]
    fn calendar_conversion_round_trips() {
        for t in [0, 951_782_400, T, 4_107_542_399, -86_400] {
            assert_eq!(DateTime::from_unix(t).to_unix(), t, "{t}");
        }
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }
}
