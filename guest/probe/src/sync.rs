//! Minimal shared-state helpers for a single-address-space kernel.

use core::cell::UnsafeCell;

/// A global owned by the bootstrap processor. APs never touch a `Global`.
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: only the BSP accesses `Global`s, and it never re-enters them from interrupt
// handlers, so there is no concurrent access.
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
