//! Integer conversions whose range is known: to `usize` on this 64-bit-only kernel, and the
//! low bits of a wider value where dropping the high bits is the intent (register halves,
//! fields of a dword).

// Each function below truncates on purpose; its doc comment says why that is right.
#![allow(clippy::cast_possible_truncation)]

const _: () = assert!(usize::BITS == 64, "the probe is a 64-bit kernel");

/// `v` as `usize`: lossless, the probe only builds for x86_64.
pub const fn usize_from(v: u64) -> usize {
    v as usize
}

/// The low 32 bits of `v`.
pub const fn lo32(v: u64) -> u32 {
    v as u32
}

/// The low 16 bits of `v`.
pub const fn lo16(v: u32) -> u16 {
    v as u16
}

/// The low 8 bits of `v`.
pub const fn lo8(v: u32) -> u8 {
    v as u8
}
