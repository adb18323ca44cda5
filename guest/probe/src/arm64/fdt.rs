//! Just enough of a flattened device tree walker for the probe: `/chosen/bootargs` and the
//! `reg` (MPIDR) of each `/cpus/cpu@...` node.

const FDT_MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;
/// Largest device tree the probe reads (the arm64 boot protocol's limit).
const MAX_SIZE: usize = 2 << 20;
/// Deepest node nesting the walker follows (the probe's properties are at depth 2 and 3).
const MAX_DEPTH: usize = 16;

/// A validated device tree in guest RAM.
#[derive(Clone, Copy)]
pub struct Fdt {
    tree: &'static [u8],
}

impl Fdt {
    /// The device tree at `addr`, or `None` if its header is not one.
    ///
    /// # Safety
    /// `addr` must be the address of readable guest RAM holding at least the tree's header;
    /// the tree's own `totalsize` (capped at 2 MiB) must be readable from there and stay
    /// unchanged while the probe runs.
    pub unsafe fn at(addr: u64) -> Option<Fdt> {
        let base = usize::try_from(addr).ok()?;
        if base == 0 || base % 8 != 0 {
            return None;
        }
        // SAFETY: the caller guarantees the 40-byte header is readable.
        let header = unsafe { core::slice::from_raw_parts(base as *const u8, 40) };
        if be32(header, 0)? != FDT_MAGIC {
            return None;
        }
        let total = usize::try_from(be32(header, 4)?).ok()?;
        if !(40..=MAX_SIZE).contains(&total) {
            return None;
        }
        // SAFETY: the caller guarantees `totalsize` bytes (checked above) are readable.
        let tree = unsafe { core::slice::from_raw_parts(base as *const u8, total) };
        Some(Fdt { tree })
    }

    /// The command line (`/chosen/bootargs`), if the tree has one.
    pub fn bootargs(&self) -> Option<&'static str> {
        let mut found = None;
        self.walk(|path, prop, value| {
            if path == [&b""[..], b"chosen"] && prop == b"bootargs" {
                let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
                found = core::str::from_utf8(&value[..end]).ok();
            }
        })?;
        found
    }

    /// Calls `f` with the MPIDR (`reg`) of each `/cpus/cpu@...` node, in the tree's order;
    /// `None` if the tree is malformed.
    pub fn for_each_cpu(&self, mut f: impl FnMut(u64)) -> Option<()> {
        self.walk(|path, prop, value| {
            let is_cpu = path.len() == 3 && path[1] == b"cpus" && path[2].starts_with(b"cpu@");
            if is_cpu && prop == b"reg" {
                let mpidr = match value.len() {
                    4 => be32(value, 0).map(u64::from),
                    8 => be32(value, 0)
                        .zip(be32(value, 4))
                        .map(|(hi, lo)| (u64::from(hi) << 32) | u64::from(lo)),
                    _ => None,
                };
                if let Some(mpidr) = mpidr {
                    f(mpidr);
                }
            }
        })
    }

    /// The PCI host bridge (`/pcie@...`, `pci-host-ecam-generic`): its ECAM window (`reg`,
    /// two cells each) and up to four memory windows from `ranges` (7-cell entries: PCI
    /// space and address, CPU address, size).
    pub fn pci_host(&self) -> Option<PciHost> {
        let mut host = PciHost {
            ecam: (0, 0),
            windows: [(0, 0); 4],
            nwindows: 0,
        };
        let mut seen_reg = false;
        self.walk(|path, prop, value| {
            if path.len() != 2 || !path[1].starts_with(b"pcie@") {
                return;
            }
            if prop == b"reg" {
                if let (Some(base), Some(size)) = (be64(value, 0), be64(value, 8)) {
                    host.ecam = (base, size);
                    seen_reg = true;
                }
            } else if prop == b"ranges" {
                for entry in value.chunks_exact(28) {
                    let (Some(cpu), Some(size)) = (be64(entry, 12), be64(entry, 20)) else {
                        continue;
                    };
                    if let Some(slot) = host.windows.get_mut(host.nwindows) {
                        *slot = (cpu, size);
                        host.nwindows += 1;
                    }
                }
            }
        })?;
        seen_reg.then_some(host)
    }

    /// Calls `f(path, property name, value)` for every property; `path` holds the node
    /// names from the root (whose name is empty). `None` if the tree is malformed.
    fn walk(
        &self,
        mut f: impl FnMut(&[&'static [u8]], &'static [u8], &'static [u8]),
    ) -> Option<()> {
        let tree = self.tree;
        let structs = usize::try_from(be32(tree, 8)?).ok()?;
        let strings = usize::try_from(be32(tree, 12)?).ok()?;
        let mut path: [&'static [u8]; MAX_DEPTH] = [&[]; MAX_DEPTH];
        let mut at = structs;
        let mut depth = 0usize;
        loop {
            let token = be32(tree, at)?;
            at += 4;
            match token {
                BEGIN_NODE => {
                    let name = cstr(tree, at)?;
                    at = align4(at + name.len() + 1);
                    *path.get_mut(depth)? = name;
                    depth += 1;
                }
                END_NODE => depth = depth.checked_sub(1)?,
                PROP => {
                    let len = usize::try_from(be32(tree, at)?).ok()?;
                    let name_off = usize::try_from(be32(tree, at + 4)?).ok()?;
                    let value = tree.get(at + 8..at.checked_add(8 + len)?)?;
                    at = align4(at + 8 + len);
                    let name = cstr(tree, strings.checked_add(name_off)?)?;
                    f(&path[..depth], name, value);
                }
                NOP => {}
                END if depth == 0 => return Some(()),
                _ => return None,
            }
        }
    }
}

/// The PCI host bridge as the device tree describes it.
#[derive(Clone, Copy, Debug)]
pub struct PciHost {
    /// ECAM base and size.
    pub ecam: (u64, u64),
    /// Memory windows for BARs (CPU address, size); the first `nwindows` are valid.
    pub windows: [(u64, u64); 4],
    /// How many windows `ranges` gave.
    pub nwindows: usize,
}

impl PciHost {
    /// Whether `[addr, addr + len)` lies inside one of the memory windows.
    pub fn in_windows(&self, addr: u64, len: u64) -> bool {
        self.windows[..self.nwindows].iter().any(|&(base, size)| {
            addr >= base
                && addr
                    .checked_add(len)
                    .is_some_and(|end| end <= base.saturating_add(size))
        })
    }
}

fn be64(bytes: &[u8], at: usize) -> Option<u64> {
    let hi = be32(bytes, at)?;
    let lo = be32(bytes, at.checked_add(4)?)?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The NUL-terminated bytes at `at` (without the NUL).
fn cstr(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let rest = bytes.get(at..)?;
    let len = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..len])
}

fn align4(x: usize) -> usize {
    (x + 3) & !3
}
