//! Minimal shared-state helpers for a single-address-space kernel.

use core::cell::UnsafeCell;

/// A global owned by the bootstrap processor. APs only read `Global`s the BSP finished
/// writing before it started them (the IDT).
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: only the BSP writes `Global`s (never from interrupt handlers); APs only read the
// IDT after the BSP filled it, so there is no concurrent mutable access.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    /// Wraps `v`.
    pub const fn new(v: T) -> Self {
        Self(UnsafeCell::new(v))
    }

    /// Shared access.
    pub fn get(&self) -> &T {
        // SAFETY: BSP-only, see the `Sync` impl.
        unsafe { &*self.0.get() }
    }

    /// Exclusive access; callers do not hold two of these at once.
    #[allow(clippy::mut_from_ref)]
    pub fn get_mut(&self) -> &mut T {
        // SAFETY: BSP-only and not held across calls that access the same global.
        unsafe { &mut *self.0.get() }
    }
}
