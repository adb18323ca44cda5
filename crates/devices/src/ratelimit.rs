//! Rate-limited warnings for events a guest can trigger at will.
//!
//! A hostile guest can submit malformed requests as fast as it likes; logging each one would let
//! it flood the host's logs. [`guest_warn!`](crate::guest_warn) logs the first few occurrences at each call site and
//! then only every power-of-two-th one, with the running count.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts one occurrence; returns the count when this one should be logged.
pub fn should_log(counter: &AtomicU64) -> Option<u64> {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    (n <= 8 || n.is_power_of_two()).then_some(n)
}

/// `tracing::warn!` for guest-triggered events, rate limited per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if let Some(n) = $crate::ratelimit::should_log(&COUNT) {
            tracing::warn!(occurrence = n, $($arg)*);
        }
    }};
}

/// `tracing::debug!` for guest-triggered events, rate limited per call site like
/// [`guest_warn!`](crate::guest_warn) (so turning debug logs on cannot let a guest flood them).
#[macro_export]
macro_rules! guest_debug {
    ($($arg:tt)*) => {{
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if let Some(n) = $crate::ratelimit::should_log(&COUNT) {
            tracing::debug!(occurrence = n, $($arg)*);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_few_then_powers_of_two() {
        let c = AtomicU64::new(0);
        let logged: Vec<u64> = (0..1000).filter_map(|_| should_log(&c)).collect();
        assert_eq!(
            logged,
            vec![1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, 512]
        );
    }
}
