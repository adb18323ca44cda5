//! Snapshots of a running VM, and restoring one in a new process.
//!
//! A snapshot directory holds:
//!
//! - `state.bin`: a versioned container (see [`format`]) with the guest architecture, the
//!   configuration, the memory layout, every vCPU and the VM-wide state (both `arch` types,
//!   stored as they serialise: x86_64's irqchips, PIT and clock), the serial port and every
//!   virtio-pci function;
//! - `memory.bin`: guest RAM, region after region; all-zero pages are left as holes;
//! - `config.json`: the configuration again, for people;
//! - `COMPLETE`: written last. A directory without it is an interrupted snapshot.
//!
//! Every file is written under a temporary name, fsynced and renamed. Restore maps
//! `memory.bin` privately, so pages are read on first touch and the file never changes.

pub mod format;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion,
};

use arch::{layout, CpuModel, VcpuState, VmState};
use devices::bus::lock;
use devices::legacy::{ExitSignal, SerialState};
use devices::virtio::pci::VirtioPciState;
use devices::GuestMem;

use crate::config::{SerialConfig, VmConfig};
use crate::vcpu::{VcpuMsg, VcpuThread};
use crate::vm::{build_devices, create_kvm_vm, register_memory, Vm};
use crate::Error;
use format::{FormatError, Section, SectionKind, Writer};

pub use vmm_api::snapshot_files::{COMPLETE_FILE, CONFIG_FILE, MEMORY_FILE, STATE_FILE};

const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

/// One guest RAM region and where it lives in `memory.bin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MemRegion {
    guest_addr: u64,
    size: u64,
    file_offset: u64,
}

/// The architecture a snapshot without an `arch` section was taken on (every snapshot
/// written before the section existed).
const UNTAGGED_ARCH: &str = "x86_64";

/// One virtio-pci function, by its position in the configuration's device order.
#[derive(Serialize, Deserialize)]
struct VirtioSection {
    index: usize,
    state: VirtioPciState,
}

/// What a snapshot took.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotStats {
    /// Guest RAM size.
    pub memory_size: u64,
    /// Bytes of RAM actually written (non-zero pages).
    pub memory_written: u64,
    /// Size of `state.bin`.
    pub state_size: u64,
    /// Wall time from the pause to the last fsync.
    pub elapsed: Duration,
}

impl std::fmt::Display for SnapshotStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory_size={} memory_written={} state_size={} ms={}",
            self.memory_size,
            self.memory_written,
            self.state_size,
            self.elapsed.as_millis()
        )
    }
}

/// Host-side settings a restore may change (paths and names on the restoring host).
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    /// Where the serial console goes.
    pub serial: Option<SerialConfig>,
    /// Disk image paths, replacing the saved ones in order.
    pub disks: Vec<PathBuf>,
    /// The vsock unix socket path.
    pub vsock_socket: Option<PathBuf>,
    /// TAP names, replacing the saved ones in order.
    pub taps: Vec<String>,
}

fn snap_err(e: impl std::fmt::Display) -> Error {
    Error::Snapshot(e.to_string())
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::Snapshot(format!("{what} {}: {e}", path.display()))
}

/// Writes `dir/name` through a temporary file: `fill` writes it, then fsync and rename.
fn write_atomic(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&File, &Path) -> Result<(), Error>,
) -> Result<(), Error> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err("cannot create", &tmp))?;
    let dst = dir.join(name);
    let result = fill(&file, &tmp)
        .and_then(|()| file.sync_all().map_err(io_err("cannot sync", &tmp)))
        .and_then(|()| std::fs::rename(&tmp, &dst).map_err(io_err("cannot rename into", &dst)));
    if result.is_err() {
        // A failed snapshot leaves no half-written file behind (a full disk stays usable).
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync directory", dir))
}

/// For an anonymous mapping of `len` bytes at `host`: which pages the process ever touched
/// (present or swapped, from /proc/self/pagemap). An untouched anonymous page reads as zero,
/// so it need not be read at all. None when pagemap cannot be read (then every page is read).
fn touched_pages(host: u64, len: u64) -> Option<Vec<bool>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let f = File::open("/proc/self/pagemap").ok()?;
    let pages = usize::try_from(len.div_ceil(PAGE as u64)).ok()?;
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; 8 * 4096];
    let mut at = (host / PAGE as u64) * 8;
    while out.len() < pages {
        let n = (pages - out.len()).min(4096);
        f.read_exact_at(&mut buf[..n * 8], at).ok()?;
        out.extend(buf[..n * 8].chunks_exact(8).map(|e| {
            let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            v & (PRESENT | SWAPPED) != 0
        }));
        at += (n * 8) as u64;
    }
    Some(out)
}

/// For `len` bytes of `file` from `start`: which pages hold data (are not in a hole), from
/// lseek(SEEK_DATA/SEEK_HOLE). None if the file system cannot tell.
fn file_data_pages(file: &File, start: u64, len: u64) -> Option<Vec<bool>> {
    use std::os::fd::AsRawFd;
    let pages = usize::try_from(len.div_ceil(PAGE as u64)).ok()?;
    let mut out = vec![false; pages];
    let end = start.checked_add(len)?;
    let mut pos = start;
    while pos < end {
        let off = libc::off_t::try_from(pos).ok()?;
        // SAFETY: lseek only reads the fd's state; the fd is open for the whole call.
        let data = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data from here to the end of the file.
            let e = std::io::Error::last_os_error();
            return (e.raw_os_error() == Some(libc::ENXIO)).then_some(out);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < data {
            return None;
        }
        let (data, hole) = (data as u64, (hole as u64).min(end));
        if data >= end {
            break;
        }
        let first = ((data - start) / PAGE as u64) as usize;
        let last = ((hole - start).div_ceil(PAGE as u64) as usize).min(pages);
        out.iter_mut()
            .take(last)
            .skip(first)
            .for_each(|p| *p = true);
        pos = hole.max(pos + 1);
    }
    Some(out)
}

/// Which pages of region `r` may hold non-zero data (None: any page may). An anonymous page
/// the process never touched is zero; a page of a private file mapping that was never touched
/// holds the file's data, which is zero in a hole.
fn maybe_nonzero(r: &GuestRegionMmap<()>) -> Option<Vec<bool>> {
    let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
    let mut pages = touched_pages(host as u64, r.len())?;
    if let Some(fo) = r.file_offset() {
        let data = file_data_pages(fo.file(), fo.start(), r.len())?;
        pages.iter_mut().zip(data).for_each(|(p, d)| *p |= d);
    }
    Some(pages)
}

/// Writes guest RAM into `file`, skipping all-zero pages (they stay holes). Returns the
/// layout and the number of bytes written.
fn save_memory(mem: &GuestMem, file: &File, path: &Path) -> Result<(Vec<MemRegion>, u64), Error> {
    static ZERO: [u8; PAGE] = [0; PAGE];
    let mut regions = Vec::new();
    let mut touched = Vec::new();
    let mut offset = 0u64;
    for r in mem.iter() {
        regions.push(MemRegion {
            guest_addr: r.start_addr().0,
            size: r.len(),
            file_offset: offset,
        });
        touched.push(maybe_nonzero(r));
        offset += r.len();
    }
    file.set_len(offset).map_err(io_err("cannot size", path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for (r, touched) in regions.iter().zip(&touched) {
        let mut done = 0u64;
        while done < r.size {
            let n = (r.size - done).min(CHUNK as u64) as usize;
            if let Some(t) = touched {
                let first = (done / PAGE as u64) as usize;
                let pages = t.get(first..(first + n.div_ceil(PAGE)).min(t.len()));
                if pages.is_some_and(|p| !p.contains(&true)) {
                    done += n as u64;
                    continue;
                }
            }
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(r.guest_addr + done))
                .map_err(snap_err)?;
            // Write each run of non-zero pages in one call.
            let mut page = 0;
            while page * PAGE < n {
                let is_zero = |p: usize| chunk[p * PAGE..((p + 1) * PAGE).min(n)] == ZERO[..];
                if is_zero(page) {
                    page += 1;
                    continue;
                }
                let start = page;
                while page * PAGE < n && !is_zero(page) {
                    page += 1;
                }
                let bytes = &chunk[start * PAGE..(page * PAGE).min(n)];
                file.write_all_at(bytes, r.file_offset + done + (start * PAGE) as u64)
                    .map_err(io_err("cannot write", path))?;
                written += bytes.len() as u64;
            }
            done += n as u64;
        }
    }
    Ok((regions, written))
}

/// Maps `memory.bin` privately (copy-on-write, read lazily) as guest RAM.
fn load_memory(path: &Path, regions: &[MemRegion], cfg: &VmConfig) -> Result<GuestMem, Error> {
    let expected = layout::ram_regions(cfg.memory_mib << 20);
    let matches = expected.len() == regions.len()
        && expected
            .iter()
            .zip(regions)
            .all(|(e, r)| e.0 .0 == r.guest_addr && e.1 as u64 == r.size);
    if !matches {
        return Err(Error::Snapshot(
            "the memory layout does not match the configuration".into(),
        ));
    }
    let file = File::open(path).map_err(io_err("cannot open", path))?;
    let len = file.metadata().map_err(io_err("cannot stat", path))?.len();
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let end = r.file_offset.checked_add(r.size);
        if end.is_none_or(|e| e > len) {
            return Err(Error::Snapshot(format!(
                "{} is shorter than the memory it should hold",
                path.display()
            )));
        }
        let fd = file.try_clone().map_err(io_err("cannot clone", path))?;
        let region = MmapRegion::<()>::build(
            Some(FileOffset::new(fd, r.file_offset)),
            r.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Memory(format!("mapping {}: {e}", path.display())))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
            .ok_or_else(|| Error::Memory("guest region overflows".into()))?;
        mapped.push(region);
    }
    GuestMem::from_regions(mapped).map_err(|e| Error::Memory(e.to_string()))
}

impl Vm {
    /// Writes a snapshot of the paused VM into `dir` (created if missing).
    pub(crate) fn save_snapshot(
        &self,
        threads: &[VcpuThread],
        dir: &Path,
    ) -> Result<SnapshotStats, Error> {
        let t0 = Instant::now();
        self.vcpu_save.check_snapshot_supported()?;
        std::fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let complete = dir.join(COMPLETE_FILE);
        match std::fs::remove_file(&complete) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("cannot remove", &complete)(e))
            }
            _ => sync_dir(dir)?,
        }

        // vCPU state, read on each (parked) vCPU thread.
        let mut vcpus = Vec::with_capacity(threads.len());
        for (id, t) in threads.iter().enumerate() {
            let (tx, rx) = channel();
            let ctx = self.vcpu_save.clone();
            let model = self.cpu_models.get(id).cloned().unwrap_or_default();
            let id = u8::try_from(id)
                .map_err(|_| Error::Snapshot(format!("vCPU index {id} does not fit a u8")))?;
            let sent = t.send(VcpuMsg::Call(Box::new(move |fd| {
                let _ = tx.send(VcpuState::save(id, fd, &ctx, &model));
            })));
            let state = sent
                .then(|| rx.recv_timeout(Duration::from_secs(5)).ok())
                .flatten()
                .ok_or_else(|| Error::Snapshot(format!("vCPU {id} did not answer")))?
                .map_err(|e| Error::Vcpu {
                    id,
                    reason: e.to_string(),
                })?;
            vcpus.push(state);
        }

        let vm_state = VmState::save(&self.vm)?;
        let serial = lock(&self.serial).save_state();
        let virtio: Vec<VirtioSection> = self
            .virtio
            .iter()
            .enumerate()
            .map(|(index, d)| VirtioSection {
                index,
                state: lock(d).save_state(),
            })
            .collect();

        let mut regions = Vec::new();
        let mut memory_written = 0;
        write_atomic(dir, MEMORY_FILE, |f, p| {
            (regions, memory_written) = save_memory(&self.mem, f, p)?;
            Ok(())
        })?;

        let mut w = Writer::new();
        w.add(SectionKind::Arch, &arch::ARCH_NAME)
            .map_err(snap_err)?;
        w.add(SectionKind::Config, &self.cfg).map_err(snap_err)?;
        w.add(SectionKind::Memory, &regions).map_err(snap_err)?;
        for v in &vcpus {
            w.add(SectionKind::Vcpu, v).map_err(snap_err)?;
        }
        w.add(SectionKind::VmState, &vm_state).map_err(snap_err)?;
        w.add(SectionKind::Serial, &serial).map_err(snap_err)?;
        for v in &virtio {
            w.add(SectionKind::VirtioPci, v).map_err(snap_err)?;
        }
        let state = w.finish();
        write_atomic(dir, STATE_FILE, |mut f, p| {
            f.write_all(&state).map_err(io_err("cannot write", p))
        })?;
        let cfg_json = serde_json::to_vec_pretty(&self.cfg).map_err(snap_err)?;
        write_atomic(dir, CONFIG_FILE, |mut f, p| {
            f.write_all(&cfg_json).map_err(io_err("cannot write", p))
        })?;
        sync_dir(dir)?;
        write_atomic(dir, COMPLETE_FILE, |mut f, p| {
            f.write_all(b"pocketvisor snapshot v1\n")
                .map_err(io_err("cannot write", p))
        })?;
        sync_dir(dir)?;
        Ok(SnapshotStats {
            memory_size: regions.iter().map(|r| r.size).sum(),
            memory_written,
            state_size: state.len() as u64,
            elapsed: t0.elapsed(),
        })
    }

    /// Rebuilds a VM from the snapshot in `dir`, paused at the instant it was taken; run it
    /// with [`Vm::run`]. Host-side paths come from the snapshot unless `overrides` changes them.
    pub fn restore(dir: &Path, overrides: &RestoreOverrides) -> Result<Vm, Error> {
        let snap = read_snapshot(dir)?;
        let mut cfg = snap.config;
        apply_overrides(&mut cfg, overrides)?;
        cfg.validate().map_err(|e| Error::Config(e.to_string()))?;
        if snap.vcpus.len() != usize::from(cfg.vcpus)
            || snap
                .vcpus
                .iter()
                .enumerate()
                .any(|(i, v)| usize::from(v.id) != i)
        {
            return Err(Error::Snapshot(
                "the vCPU sections do not match the configuration".into(),
            ));
        }

        let (kvm, vm) = create_kvm_vm(&cfg)?;
        let mem = load_memory(&dir.join(MEMORY_FILE), &snap.memory, &cfg)?;
        register_memory(&vm, &mem)?;
        let exit = Arc::new(ExitSignal::new().map_err(Error::io("create exit event"))?);
        let devs = build_devices(&cfg, &vm, &mem, &exit, Some(&snap.serial))?;
        if devs.virtio.len() != snap.virtio.len()
            || snap.virtio.iter().enumerate().any(|(i, v)| v.index != i)
        {
            return Err(Error::Snapshot(format!(
                "the snapshot has {} virtio devices, the configuration {}",
                snap.virtio.len(),
                devs.virtio.len()
            )));
        }
        for (i, (dev, saved)) in devs.virtio.iter().zip(&snap.virtio).enumerate() {
            lock(dev)
                .restore_state(&saved.state)
                .map_err(|e| Error::Device {
                    name: format!("virtio device {i}"),
                    reason: e.to_string(),
                })?;
        }
        lock(&devs.root).refresh_all();

        snap.vm_state.restore(&vm)?;

        let mut vcpus = Vec::with_capacity(snap.vcpus.len());
        let mut cpu_models = Vec::with_capacity(snap.vcpus.len());
        for st in &snap.vcpus {
            let vcpu = vm
                .create_vcpu(st.id.into())
                .map_err(Error::kvm("create vCPU"))?;
            arch::setup_cpuid(&kvm, &vcpu, st.id, cfg.vcpus, &cfg.cpuid_hide)?;
            let vcpu_err = |e: arch::Error| Error::Vcpu {
                id: st.id,
                reason: e.to_string(),
            };
            st.restore_cpu_model(&vcpu).map_err(vcpu_err)?;
            st.restore(&vcpu).map_err(vcpu_err)?;
            // A snapshot without a CPU model keeps the one this host gave the new vCPU.
            cpu_models.push(match st.cpu_model() {
                Some(model) => model,
                None => CpuModel::read(&vcpu).map_err(vcpu_err)?,
            });
            vcpus.push(vcpu);
        }
        for dev in &devs.virtio {
            lock(dev).renotify_queues();
        }
        Ok(Vm::assemble(
            cfg,
            kvm,
            vm,
            mem,
            exit,
            devs,
            (vcpus, cpu_models),
        ))
    }
}

fn apply_overrides(cfg: &mut VmConfig, o: &RestoreOverrides) -> Result<(), Error> {
    if let Some(s) = &o.serial {
        cfg.serial = s.clone();
    }
    if o.disks.len() > cfg.disks.len() {
        return Err(Error::Config(format!(
            "{} disks given, the snapshot has {}",
            o.disks.len(),
            cfg.disks.len()
        )));
    }
    for (d, p) in cfg.disks.iter_mut().zip(&o.disks) {
        d.path = p.clone();
    }
    if o.taps.len() > cfg.net.len() {
        return Err(Error::Config(format!(
            "{} taps given, the snapshot has {} network devices",
            o.taps.len(),
            cfg.net.len()
        )));
    }
    for (n, t) in cfg.net.iter_mut().zip(&o.taps) {
        n.tap = t.clone();
    }
    if let Some(p) = &o.vsock_socket {
        match &mut cfg.vsock {
            Some(v) => v.socket = p.clone(),
            None => return Err(Error::Config("the snapshot has no vsock device".into())),
        }
    }
    Ok(())
}

/// The decoded contents of `state.bin`.
struct Snapshot {
    config: VmConfig,
    memory: Vec<MemRegion>,
    vcpus: Vec<VcpuState>,
    vm_state: VmState,
    serial: SerialState,
    virtio: Vec<VirtioSection>,
}

fn one(sections: &[Section], kind: SectionKind) -> Result<&Section, FormatError> {
    let mut it = sections.iter().filter(|s| s.kind == kind);
    match (it.next(), it.next()) {
        (Some(s), None) => Ok(s),
        _ => Err(FormatError::Missing(kind.name())),
    }
}

/// Refuses a snapshot taken on another architecture (one without an `arch` section predates
/// the tag and is x86_64), before any architecture-specific section is decoded.
fn check_arch(sections: &[Section]) -> Result<(), Error> {
    let mut tags = sections.iter().filter(|s| s.kind == SectionKind::Arch);
    let saved: String = match (tags.next(), tags.next()) {
        (None, _) => UNTAGGED_ARCH.to_string(),
        (Some(s), None) => s.decode()?,
        (Some(_), Some(_)) => return Err(FormatError::Missing(SectionKind::Arch.name()).into()),
    };
    if saved != arch::ARCH_NAME {
        return Err(Error::Snapshot(format!(
            "this snapshot holds a {saved} guest; this pocketvisor runs {} guests and cannot \
             restore it",
            arch::ARCH_NAME
        )));
    }
    Ok(())
}

/// Reads and checks a snapshot directory's `state.bin` (after its `COMPLETE` marker).
fn read_snapshot(dir: &Path) -> Result<Snapshot, Error> {
    if !dir.join(COMPLETE_FILE).is_file() {
        return Err(Error::Snapshot(format!(
            "{} is not a complete snapshot (no {COMPLETE_FILE} marker)",
            dir.display()
        )));
    }
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io_err("cannot read", &path))?;
    let sections = format::read(&bytes)?;
    check_arch(&sections)?;
    let all = |kind| sections.iter().filter(move |s: &&Section| s.kind == kind);
    Ok(Snapshot {
        config: one(&sections, SectionKind::Config)?.decode()?,
        memory: one(&sections, SectionKind::Memory)?.decode()?,
        vcpus: all(SectionKind::Vcpu)
            .map(|s| s.decode())
            .collect::<Result<_, _>>()?,
        vm_state: one(&sections, SectionKind::VmState)?.decode()?,
        serial: one(&sections, SectionKind::Serial)?.decode()?,
        virtio: all(SectionKind::VirtioPci)
            .map(|s| s.decode())
            .collect::<Result<_, _>>()?,
    })
}

/// Checks a snapshot directory without building a VM: the marker, the container and every
/// section decode. Returns the saved configuration.
pub fn inspect(dir: &Path) -> Result<VmConfig, Error> {
    Ok(read_snapshot(dir)?.config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections_with_arch(tags: &[&str]) -> Vec<Section> {
        let mut w = Writer::new();
        for t in tags {
            w.add(SectionKind::Arch, t).unwrap();
        }
        w.add(SectionKind::Config, &"cfg").unwrap();
        format::read(&w.finish()).unwrap()
    }

    #[test]
    fn a_snapshot_only_restores_on_its_own_architecture() {
        // Written before the tag existed: x86_64.
        let untagged = check_arch(&sections_with_arch(&[]));
        assert_eq!(untagged.is_ok(), arch::ARCH_NAME == "x86_64");
        assert!(check_arch(&sections_with_arch(&[arch::ARCH_NAME])).is_ok());
        let other = if arch::ARCH_NAME == "x86_64" {
            "aarch64"
        } else {
            "x86_64"
        };
        let e = check_arch(&sections_with_arch(&[other])).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "snapshot: this snapshot holds a {other} guest; this pocketvisor runs {} \
                 guests and cannot restore it",
                arch::ARCH_NAME
            )
        );
        let twice = check_arch(&sections_with_arch(&[arch::ARCH_NAME, arch::ARCH_NAME]));
        assert!(matches!(
            twice,
            Err(Error::Format(FormatError::Missing("arch")))
        ));
    }

    #[test]
    fn memory_round_trips_with_holes() {
        let dir = std::env::temp_dir().join(format!("pv-snap-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = VmConfig::new("k".into());
        cfg.memory_mib = 64;
        let mem = GuestMem::from_ranges(&layout::ram_regions(64 << 20)).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; 5000], GuestAddress(0x30_0ff0))
            .unwrap();
        let path = dir.join(MEMORY_FILE);
        let mut regions = Vec::new();
        let mut written = 0;
        write_atomic(&dir, MEMORY_FILE, |f, p| {
            (regions, written) = save_memory(&mem, f, p)?;
            Ok(())
        })
        .unwrap();
        // Three non-zero pages: 0x1000 and the two (three with the tail) around 0x300ff0.
        assert_eq!(written, 4 * PAGE as u64);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "zero pages were written");

        let back = load_memory(&path, &regions, &cfg).unwrap();
        let mut b = [0u8; 5];
        back.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        let mut c = [0u8; 5000];
        back.read_slice(&mut c, GuestAddress(0x30_0ff0)).unwrap();
        assert!(c.iter().all(|&x| x == 7));
        // Writes go to the private copy, never to the file.
        back.write_slice(b"XXXXX", GuestAddress(0x1000)).unwrap();
        let again = load_memory(&path, &regions, &cfg).unwrap();
        again.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        // A failing writer leaves nothing behind.
        let failed = write_atomic(&dir, "x.bin", |_, _| Err(Error::Snapshot("no".into())));
        assert!(failed.is_err());
        assert!(!dir.join(".x.bin.tmp").exists() && !dir.join("x.bin").exists());
        // Saving a restored (file-backed) memory again writes the file's data pages and the
        // page changed since, and nothing else.
        back.write_slice(b"new", GuestAddress(0x50_0000)).unwrap();
        let again_dir = dir.join("again");
        std::fs::create_dir_all(&again_dir).unwrap();
        let mut written2 = 0;
        write_atomic(&again_dir, MEMORY_FILE, |f, p| {
            (_, written2) = save_memory(&back, f, p)?;
            Ok(())
        })
        .unwrap();
        assert_eq!(written2, 5 * PAGE as u64);
        let third = load_memory(&again_dir.join(MEMORY_FILE), &regions, &cfg).unwrap();
        third.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"XXXXX");
        third.read_slice(&mut c, GuestAddress(0x30_0ff0)).unwrap();
        assert!(c.iter().all(|&x| x == 7));
        // A layout that does not fit the configuration is refused.
        cfg.memory_mib = 128;
        assert!(load_memory(&path, &regions, &cfg).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
