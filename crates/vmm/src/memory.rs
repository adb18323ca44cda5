//! Guest RAM: allocation, KVM memory slots, KSM, and dirty page tracking.
//!
//! Two sources tell which pages changed: KVM's dirty log (pages the guest's vCPUs wrote; on
//! only after [`DirtyLog::start`], which re-registers every slot with
//! `KVM_MEM_LOG_DIRTY_PAGES`) and the dirty bitmap every region of [`GuestMem`] carries
//! (pages the VMM and the device models wrote through `vm-memory`; always on).
//! [`DirtyLog::dirty_pages`] returns both ORed together and clears them.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, MmapRegion};

use arch::layout;
use devices::bus::lock;
use devices::GuestMem;

use crate::Error;

/// The page size of dirty tracking (KVM's and the bitmap's: the host page size on x86_64).
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// Allocates guest RAM and registers it with KVM, one slot per region.
pub(crate) fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMem, Error> {
    let ranges = layout::ram_regions(size);
    let mem = GuestMem::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))?;
    register_memory(vm, &mem)?;
    Ok(mem)
}

/// Registers every region of `mem` with KVM, one slot per region (slot = region index).
pub(crate) fn register_memory(vm: &VmFd, mem: &GuestMem) -> Result<(), Error> {
    set_slots(vm, mem, 0)
}

/// (Re-)registers every region of `mem` in its slot with `flags`.
fn set_slots(vm: &VmFd, mem: &GuestMem, flags: u32) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let slot = u32::try_from(slot).map_err(|_| Error::Memory("too many regions".into()))?;
        let r = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which the
        // VM keeps alive for as long as the VM exists (and a `DirtyLog` holds a clone).
        unsafe { vm.set_user_memory_region(r) }.map_err(Error::kvm("set memory region"))?;
    }
    Ok(())
}

/// Marks every guest RAM region mergeable for KSM (`MADV_MERGEABLE`); the host merges identical
/// pages when `/sys/kernel/mm/ksm/run` is 1. A host without KSM only gets a warning.
pub(crate) fn mark_mergeable(mem: &GuestMem) {
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let Ok(len) = usize::try_from(region.len()) else {
            continue;
        };
        // SAFETY: `[host, host + len)` is exactly one live guest RAM mapping owned by `mem`;
        // MADV_MERGEABLE only lets the kernel share identical pages copy-on-write, which is
        // invisible to every reader and writer of the memory.
        let r = unsafe { libc::madvise(host.cast(), len, libc::MADV_MERGEABLE) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!("guest RAM cannot be marked mergeable (is KSM in this kernel?): {e}");
            return;
        }
    }
}

/// The pages of one guest RAM region that changed: bit `i % 64` of `bitmap[i / 64]` is the
/// page at `guest_addr + i * DIRTY_PAGE_SIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRegion {
    /// Where the region starts in guest physical memory.
    pub guest_addr: u64,
    /// Its size in bytes.
    pub size: u64,
    /// One bit per page.
    pub bitmap: Vec<u64>,
}

impl DirtyRegion {
    /// The guest physical address of every dirty page, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        // Word by word, skipping clean ones: a 512 MiB region is 2048 words, and testing each
        // of its 131072 bits took 100-200 µs of a migration's pause for a few dirty pages.
        self.bitmap
            .iter()
            .enumerate()
            .filter(|(_, &bits)| bits != 0)
            .flat_map(move |(word, &bits)| {
                let mut left = bits;
                std::iter::from_fn(move || {
                    (left != 0).then(|| {
                        let b = u64::from(left.trailing_zeros());
                        left &= left - 1;
                        self.guest_addr + (word as u64 * 64 + b) * DIRTY_PAGE_SIZE
                    })
                })
            })
    }

    /// The dirty pages as runs of consecutive pages, each `(guest address, bytes)`, in order:
    /// at most `max_pages` pages long, the last one cut at the region's end (its last page may
    /// be short of a whole page).
    pub fn runs(&self, max_pages: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = self.guest_addr + self.size;
        let mut pages = self.pages().peekable();
        std::iter::from_fn(move || {
            let first = pages.next()?;
            let mut n = 1u64;
            while n < max_pages && pages.peek() == Some(&(first + n * DIRTY_PAGE_SIZE)) {
                pages.next();
                n += 1;
            }
            Some((first, (first + n * DIRTY_PAGE_SIZE).min(end) - first))
        })
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Dirty page tracking of one VM's guest RAM; clones share it, and it stays usable from other
/// threads while the VM runs (a migration sender holds one).
#[derive(Clone)]
pub struct DirtyLog {
    vm: Arc<VmFd>,
    mem: GuestMem,
    /// Whether the slots carry `KVM_MEM_LOG_DIRTY_PAGES`.
    logging: Arc<Mutex<bool>>,
}

impl DirtyLog {
    pub(crate) fn new(vm: Arc<VmFd>, mem: GuestMem) -> Self {
        DirtyLog {
            vm,
            mem,
            logging: Arc::new(Mutex::new(false)),
        }
    }

    /// Starts logging the pages the guest writes (KVM's dirty log) and forgets every change
    /// recorded so far: the next [`dirty_pages`](Self::dirty_pages) has what changed from now.
    pub fn start(&self) -> Result<(), Error> {
        let mut logging = lock(&self.logging);
        if !*logging {
            set_slots(&self.vm, &self.mem, KVM_MEM_LOG_DIRTY_PAGES)?;
            *logging = true;
        }
        drop(logging);
        self.dirty_pages().map(drop)
    }

    /// Stops KVM's dirty log (the bitmap of VMM and device writes stays on).
    pub fn stop(&self) -> Result<(), Error> {
        let mut logging = lock(&self.logging);
        if *logging {
            set_slots(&self.vm, &self.mem, 0)?;
            *logging = false;
        }
        Ok(())
    }

    /// Whether KVM's dirty log is on.
    pub fn is_logging(&self) -> bool {
        *lock(&self.logging)
    }

    /// The pages that changed since the last call (or [`start`](Self::start)), region by
    /// region, and clears the record: pages the guest wrote (when logging) ORed with pages
    /// the VMM and devices wrote.
    pub fn dirty_pages(&self) -> Result<Vec<DirtyRegion>, Error> {
        let logging = lock(&self.logging);
        let mut out = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let mut bitmap = MmapRegion::bitmap(region).get_and_reset();
            if *logging {
                let slot =
                    u32::try_from(slot).map_err(|_| Error::Memory("too many regions".into()))?;
                let size = usize::try_from(region.len())
                    .map_err(|_| Error::Memory("region too large".into()))?;
                let kvm = self
                    .vm
                    .get_dirty_log(slot, size)
                    .map_err(Error::kvm("get dirty log"))?;
                if kvm.len() > bitmap.len() {
                    bitmap.resize(kvm.len(), 0);
                }
                bitmap.iter_mut().zip(&kvm).for_each(|(b, k)| *b |= k);
            }
            out.push(DirtyRegion {
                guest_addr: region.start_addr().0,
                size: region.len(),
                bitmap,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use vm_memory::{Bytes, GuestAddress};

    /// The VmFlags of the mapping holding `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut in_mapping = false;
        for line in smaps.lines() {
            let range = line.split_once(' ').map(|(r, _)| r).unwrap_or("");
            let bounds = range.split_once('-').and_then(|(lo, hi)| {
                Some((
                    usize::from_str_radix(lo, 16).ok()?,
                    usize::from_str_radix(hi, 16).ok()?,
                ))
            });
            if let Some((lo, hi)) = bounds {
                in_mapping = (lo..hi).contains(&addr);
            } else if in_mapping {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.trim().to_string());
                }
            }
        }
        None
    }

    #[test]
    fn mergeable_marks_every_region() {
        if !Path::new("/sys/kernel/mm/ksm").exists() {
            eprintln!("skipped: this kernel has no KSM");
            return;
        }
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), 2 << 20), (GuestAddress(4 << 20), 2 << 20)])
                .unwrap();
        let starts: Vec<usize> = mem
            .iter()
            .map(|r| r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize)
            .collect();
        let merge_flag = |s: usize| vm_flags(s).unwrap().split(' ').any(|f| f == "mg");
        assert!(!starts.iter().any(|&s| merge_flag(s)));
        mark_mergeable(&mem);
        assert!(starts.iter().all(|&s| merge_flag(s)));
    }

    #[test]
    fn dirty_region_lists_its_pages() {
        let r = DirtyRegion {
            guest_addr: 0x10_0000,
            size: 192 * DIRTY_PAGE_SIZE,
            bitmap: vec![0b101, 0, 1 << 63 | 1],
        };
        let pages: Vec<u64> = r.pages().collect();
        assert_eq!(
            pages,
            vec![
                0x10_0000,
                0x10_2000,
                0x10_0000 + 128 * 0x1000,
                0x10_0000 + 191 * 0x1000
            ]
        );
        assert_eq!(r.count(), 4);
    }

    #[test]
    fn dirty_runs_join_neighbours_up_to_the_limit_and_stop_at_the_region_end() {
        let page = DIRTY_PAGE_SIZE;
        // Pages 0-4, 6 and 63 dirty; the region ends half-way through page 63.
        let r = DirtyRegion {
            guest_addr: 0x10_0000,
            size: 63 * page + page / 2,
            bitmap: vec![0b101_1111 | 1 << 63],
        };
        let runs: Vec<(u64, u64)> = r.runs(2).collect();
        assert_eq!(
            runs,
            vec![
                (0x10_0000, 2 * page),
                (0x10_0000 + 2 * page, 2 * page),
                (0x10_0000 + 4 * page, page),
                (0x10_0000 + 6 * page, page),
                (0x10_0000 + 63 * page, page / 2),
            ]
        );
        let long: Vec<(u64, u64)> = r.runs(256).collect();
        assert_eq!(long[0], (0x10_0000, 5 * page));
        assert_eq!(long.len(), 3);
        assert_eq!(
            r.runs(256).map(|(_, n)| n).sum::<u64>(),
            6 * page + page / 2
        );
    }

    /// CPU time of this thread (immune to other processes taking the cores).
    fn thread_cpu() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(r, 0);
        std::time::Duration::new(
            u64::try_from(ts.tv_sec).unwrap(),
            u32::try_from(ts.tv_nsec).unwrap(),
        )
    }

    /// CPU ns per MiB of device writes (`write_slice`, what virtio-blk does with the data it
    /// read) of `piece` bytes each, over 64 MiB of guest RAM of type `M`.
    fn write_cost<M: Bytes<GuestAddress>>(mem: &M, piece: usize, rounds: usize) -> f64
    where
        M::E: std::fmt::Debug,
    {
        let data = vec![0x5au8; piece];
        let per_round = (64 << 20) / piece;
        let t0 = thread_cpu();
        for _ in 0..rounds {
            for i in 0..per_round {
                mem.write_slice(&data, GuestAddress((i * piece) as u64))
                    .unwrap();
            }
        }
        let mib = (rounds * 64) as f64;
        (thread_cpu() - t0).as_nanos() as f64 / mib
    }

    /// The dirty bitmap's cost on device writes, against guest memory without one. Run with
    /// `cargo test --release -p vmm --lib bitmap_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement: run it in release mode"]
    fn bitmap_cost_on_device_writes() {
        let ranges = [(GuestAddress(0), 64 << 20)];
        let plain = vm_memory::GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        let tracked = GuestMem::from_ranges(&ranges).unwrap();
        for piece in [4096, 64 << 10, 1 << 20] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..7 {
                a.push(write_cost(&plain, piece, 4));
                b.push(write_cost(&tracked, piece, 4));
            }
            a.sort_by(f64::total_cmp);
            b.sort_by(f64::total_cmp);
            let (a, b) = (a[3], b[3]);
            println!(
                "bitmap cost, writes of {piece} B: {:.0} us/GiB without, {:.0} us/GiB with \
                 ({:+.1}%; medians of 7, thread CPU time)",
                a * 1024.0 / 1000.0,
                b * 1024.0 / 1000.0,
                (b / a - 1.0) * 100.0
            );
        }
    }

    #[test]
    fn writes_through_guest_memory_mark_the_bitmap() {
        // The bitmap half of the dirty log, without KVM: what devices write shows up.
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(2 << 20), 1 << 20)])
                .unwrap();
        mem.write_slice(&[1; 2], GuestAddress(0x3fff)).unwrap();
        mem.write_obj(7u32, GuestAddress((2 << 20) + 0x5000))
            .unwrap();
        let mut seen = Vec::new();
        for region in mem.iter() {
            let bits = MmapRegion::bitmap(region).get_and_reset();
            let r = DirtyRegion {
                guest_addr: region.start_addr().0,
                size: region.len(),
                bitmap: bits,
            };
            seen.extend(r.pages());
        }
        assert_eq!(seen, vec![0x3000, 0x4000, (2 << 20) + 0x5000]);
        assert!(MmapRegion::bitmap(mem.iter().next().unwrap())
            .get_and_reset()
            .iter()
            .all(|&w| w == 0));
    }
}
