//! Just enough of a flattened device tree walker to read `/chosen/bootargs`.

const FDT_MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
/// Largest device tree the probe reads (the arm64 boot protocol's limit).
const MAX_SIZE: usize = 2 << 20;

/// The command line in the device tree at `addr`, or `None` if it has none or is malformed.
///
/// # Safety
/// `addr` must be the address of readable guest RAM holding at least the tree's header;
/// the tree's own `totalsize` (capped at 2 MiB) must be readable from there.
pub unsafe fn bootargs(addr: u64) -> Option<&'static str> {
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
    let tree: &'static [u8] = unsafe { core::slice::from_raw_parts(base as *const u8, total) };
    let structs = usize::try_from(be32(tree, 8)?).ok()?;
    let strings = usize::try_from(be32(tree, 12)?).ok()?;
    let mut at = structs;
    let mut depth = 0usize;
    let mut in_chosen = false;
    loop {
        let token = be32(tree, at)?;
        at += 4;
        match token {
            BEGIN_NODE => {
                let name = cstr(tree, at)?;
                at = align4(at + name.len() + 1);
                depth += 1;
                in_chosen = depth == 2 && name == b"chosen";
            }
            END_NODE => {
                depth = depth.checked_sub(1)?;
                in_chosen = false;
            }
            PROP => {
                let len = usize::try_from(be32(tree, at)?).ok()?;
                let name_off = usize::try_from(be32(tree, at + 4)?).ok()?;
                let value = tree.get(at + 8..at.checked_add(8 + len)?)?;
                at = align4(at + 8 + len);
                if in_chosen && cstr(tree, strings.checked_add(name_off)?)? == b"bootargs" {
                    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
                    return core::str::from_utf8(&value[..end]).ok();
                }
            }
            NOP => {}
            _ => return None,
        }
    }
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
