//! Explicit narrowing of integers where dropping the high bits is the intent: a register
//! access narrower than the value it was assembled into, a field extracted by shifting, a
//! count already bounded by a buffer size.

/// The low 8 bits of `v`.
#[allow(clippy::cast_possible_truncation)] // Truncation is what this function is for.
pub(crate) const fn low_u8(v: u64) -> u8 {
    v as u8
}

/// The low 16 bits of `v`.
#[allow(clippy::cast_possible_truncation)] // Truncation is what this function is for.
pub(crate) const fn low_u16(v: u64) -> u16 {
    v as u16
}

/// The low 32 bits of `v`.
#[allow(clippy::cast_possible_truncation)] // Truncation is what this function is for.
pub(crate) const fn low_u32(v: u64) -> u32 {
    v as u32
}

/// `n`, a length bounded by a buffer the device sized (far below 4 GiB), as a `u32`;
/// saturates rather than wraps if that bound were ever broken.
pub(crate) fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_keeps_the_low_bits_and_lengths_saturate() {
        assert_eq!(low_u8(0x1234), 0x34);
        assert_eq!(low_u16(0x1_2345), 0x2345);
        assert_eq!(low_u32(0x1_0000_0002), 2);
        assert_eq!(len_u32(12), 12);
        assert_eq!(len_u32(usize::MAX), u32::MAX);
    }
}
