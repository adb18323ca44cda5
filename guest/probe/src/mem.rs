//! A bump allocator over a fixed physical arena above the kernel image.
//! Everything is identity mapped, so addresses are both physical and virtual.

use core::sync::atomic::{AtomicU64, Ordering};

/// End of the arena: the probe needs at least 64 MiB of RAM.
pub const ARENA_END: u64 = 0x300_0000;

static NEXT: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static __kernel_end: u8;
}

/// Starts the arena at the first 2 MiB boundary after the kernel.
pub fn init() {
    let end = core::ptr::addr_of!(__kernel_end) as u64;
    NEXT.store((end + 0x1F_FFFF) & !0x1F_FFFF, Ordering::SeqCst);
}

/// Allocates `size` zeroed bytes aligned to `align` (a power of two). Panics when exhausted.
pub fn alloc(size: u64, align: u64) -> u64 {
    let start = alloc_uninit(size, align);
    // SAFETY: [start, start+size) is inside the arena, identity-mapped RAM that nothing else uses.
    unsafe { core::ptr::write_bytes(start as *mut u8, 0, crate::bits::usize_from(size)) };
    start
}

/// Allocates `size` bytes (contents undefined) aligned to `align` (a power of two).
/// Panics when exhausted.
pub fn alloc_uninit(size: u64, align: u64) -> u64 {
    let mut cur = NEXT.load(Ordering::SeqCst);
    loop {
        let start = (cur + align - 1) & !(align - 1);
        let end = start + size;
        assert!(end <= ARENA_END, "probe arena exhausted");
        match NEXT.compare_exchange(cur, end, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return start,
            Err(v) => cur = v,
        }
    }
}

/// Takes the rest of the arena (no allocation succeeds after it); returns its start, 4 KiB
/// aligned. The caller owns `[start, ARENA_END)` and may use RAM above the arena too.
pub fn take_rest() -> u64 {
    let cur = NEXT.swap(ARENA_END, Ordering::SeqCst);
    ((cur + 0xFFF) & !0xFFF).min(ARENA_END)
}

/// Allocates one zeroed 4 KiB page.
pub fn page() -> u64 {
    alloc(4096, 4096)
}

/// Copies `len` bytes between probe-owned buffers (or from device-written DMA buffers).
pub fn copy(from: u64, to: u64, len: usize) {
    // SAFETY: both ranges are identity-mapped RAM owned by the probe and do not overlap
    // (callers copy between distinct allocations).
    unsafe { core::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len) }
}

/// A byte slice view of probe-owned memory.
pub fn bytes(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: callers pass buffers they obtained from `alloc`; each buffer has one user.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}
