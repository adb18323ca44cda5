//! Snapshots of a running VM, and restoring one in a new process.
//!
//! A snapshot directory holds:
//!
//! - `state.bin`: a versioned container (see [`format`](mod@format)) with the guest
//!   architecture, the configuration, the memory layout, every vCPU and the VM-wide state (both
//!   `arch` types, stored as they serialise: x86_64's irqchips, PIT and clock, the clock with
//!   the host time it was read at), the serial port, the other platform devices (x86_64's CMOS
//!   RTC with the guest's offset from the host's time; in a firmware boot the fw_cfg
//!   device's selected item and read position) and every virtio device with its virtio-pci function, keyed by device id (older snapshots
//!   keyed them by position and still restore);
//! - `memory.bin`: guest RAM, region after region; all-zero pages are left as holes;
//! - `config.json`: the configuration again, for people;
//! - `COMPLETE`: written last. A directory without it is an interrupted snapshot.
//!
//! `state.bin` carries the SHA-256 of its body and a `digests` section with the SHA-256 of
//! every 1 MiB piece of `memory.bin` and of `config.json`; a restore (and [`inspect`]) checks
//! them all, and the `COMPLETE` marker's exact text, before it maps anything, so one damaged
//! byte in any file is a clear error that leaves the snapshot in place.
//!
//! Every file is written under a temporary name, fsynced and renamed. Restore maps
//! `memory.bin` privately, so pages are read on first touch and the file never changes.
//!
//! The same state, followed by the non-zero pages of guest RAM, also goes over a byte stream
//! (see [`stream`]) with the same checks, so a snapshot can be sent over a socket.

pub mod format;
pub(crate) mod memory;
pub mod stream;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use arch::{CpuModel, PlatformState, VcpuState, VmState};
use devices::bus::lock;
use devices::legacy::{ExitSignal, SerialState};
use devices::virtio::pci::VirtioPciState;

use crate::config::{SerialConfig, VmConfig};
use crate::device_manager::DeviceSection;
use crate::memory::register_memory;
use crate::vcpu::VcpuThread;
use crate::vm::{build_devices, create_kvm_vm, setup_vm_alongside, Vm};
use crate::Error;
use devices::GuestMem;
use format::{FormatError, Section, SectionKind, Writer};
use memory::{
    check_layout, load_encrypted_memory, load_memory, save_memory, verify_memory, MemRegion,
    MemoryCipher, MemoryDigests,
};
use stream::StreamReader;

pub use vmm_api::snapshot_files::{COMPLETE_FILE, CONFIG_FILE, MEMORY_FILE, STATE_FILE};

/// The architecture a snapshot without an `arch` section was taken on (every snapshot
/// written before the section existed).
const UNTAGGED_ARCH: &str = "x86_64";

/// One virtio-pci function, by its position in the configuration's device order (how
/// snapshots stored devices before they had ids; read, no longer written).
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
    /// The data keys of the saved configuration's encrypted disks, by disk position (None for
    /// a plain disk). Keys are never in a snapshot: an encrypted disk restores only with one.
    pub disk_keys: Vec<Option<vmm_api::config::DiskKeyMaterial>>,
    /// The guest's vsock CID, replacing the saved one (a clone's fresh identity: the
    /// restored vsock device tells the guest with a transport reset, and its config has it).
    pub vsock_cid: Option<u64>,
    /// The guest's MAC addresses, replacing the saved ones in order (a clone's fresh
    /// identity: the restored virtio-net device's config space holds it, which a driver
    /// reads at its probe; see `Net::config_may_change_at_restore`).
    pub macs: Vec<[u8; 6]>,
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
    hostfs::sync_dir(dir).map_err(io_err("cannot sync directory", dir))
}

/// Where a snapshot goes.
enum Sink<'a> {
    /// A snapshot directory.
    Dir(&'a Path),
    /// A byte stream (see [`stream`]).
    Stream(&'a mut dyn std::io::Write),
}

/// Where a snapshot comes from.
enum Source<'a> {
    /// A snapshot directory.
    Dir(&'a Path),
    /// A byte stream (see [`stream`]).
    Stream(StreamReader<'a>),
}

impl Vm {
    /// Writes a snapshot of the paused VM into `dir` (created if missing).
    pub(crate) fn save_snapshot(
        &self,
        threads: &[VcpuThread],
        dir: &Path,
    ) -> Result<SnapshotStats, Error> {
        self.write_snapshot(threads, Sink::Dir(dir))
    }

    /// Writes a snapshot of the paused VM into the byte stream `w` (see [`stream`]).
    pub(crate) fn send_snapshot(
        &self,
        threads: &[VcpuThread],
        w: &mut dyn std::io::Write,
    ) -> Result<SnapshotStats, Error> {
        self.write_snapshot(threads, Sink::Stream(w))
    }

    fn write_snapshot(
        &self,
        threads: &[VcpuThread],
        sink: Sink<'_>,
    ) -> Result<SnapshotStats, Error> {
        let t0 = Instant::now();
        self.vcpu_save.check_snapshot_supported()?;
        if let Sink::Dir(dir) = sink {
            std::fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
            let complete = dir.join(COMPLETE_FILE);
            match std::fs::remove_file(&complete) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err("cannot remove", &complete)(e))
                }
                _ => sync_dir(dir)?,
            }
        }

        let (mut w, regions) = self.state_sections(threads)?;
        let stats = |memory_written, state: &[u8]| SnapshotStats {
            memory_size: regions.iter().map(|r| r.size).sum(),
            memory_written,
            state_size: state.len() as u64,
            elapsed: t0.elapsed(),
        };
        let dir = match sink {
            Sink::Dir(dir) => dir,
            Sink::Stream(out) => {
                let state = w.finish();
                return Ok(stats(stream::write(out, &state, &self.mem)?, &state));
            }
        };
        let mut memory_written = 0;
        let mut memory = MemoryDigests::default();
        // A VM with an encrypted disk keeps its memory encrypted at rest too.
        let cipher = memory_cipher(&self.cfg)?;
        write_atomic(dir, MEMORY_FILE, |f, p| {
            (_, memory_written, memory) = save_memory(&self.mem, f, p, cipher.as_ref())?;
            Ok(())
        })?;
        let cfg_json = serde_json::to_vec_pretty(&self.cfg).map_err(snap_err)?;
        let digests = FileDigests {
            memory,
            config_json: format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&cfg_json)),
            memory_encrypted: cipher.is_some(),
        };
        w.add(SectionKind::Digests, &digests).map_err(snap_err)?;
        let state = w.finish();
        write_atomic(dir, STATE_FILE, |mut f, p| {
            f.write_all(&state).map_err(io_err("cannot write", p))
        })?;
        write_atomic(dir, CONFIG_FILE, |mut f, p| {
            f.write_all(&cfg_json).map_err(io_err("cannot write", p))
        })?;
        sync_dir(dir)?;
        write_atomic(dir, COMPLETE_FILE, |mut f, p| {
            f.write_all(COMPLETE_TEXT)
                .map_err(io_err("cannot write", p))
        })?;
        sync_dir(dir)?;
        Ok(stats(memory_written, &state))
    }

    /// The paused VM's state as snapshot sections (architecture, configuration, memory
    /// layout, vCPUs, VM-wide state, serial port, devices by id), and the memory layout.
    pub(crate) fn state_sections(
        &self,
        threads: &[VcpuThread],
    ) -> Result<(Writer, Vec<MemRegion>), Error> {
        let ((), w) = self.state_sections_with_copy(threads, || Ok(()))?;
        Ok((w, memory::layout_of(&self.mem)))
    }

    /// [`state_sections`](Self::state_sections) of the paused VM, with `copy` run after the
    /// VM-wide state is saved: on aarch64 that writes the vGIC's tables into guest RAM, so a
    /// `copy` of the pages dirtied so far (a migration's or a checkpoint's last ones) holds
    /// them too. The vCPUs' state is read on this thread (see [`VcpuThread::parked_fd`]).
    pub(crate) fn state_sections_with_copy<T>(
        &self,
        threads: &[VcpuThread],
        copy: impl FnOnce() -> Result<T, Error>,
    ) -> Result<(T, Writer), Error> {
        let nr_vcpus = u8::try_from(threads.len())
            .map_err(|_| Error::Snapshot(format!("{} vCPUs do not fit a u8", threads.len())))?;
        let vm_state = VmState::save(&self.vm, &self._platform, nr_vcpus)?;
        let serial = lock(&self.serial).save_state();
        let platform = self.legacy.save_platform();
        let devices = self.devices.save();

        let copied = copy()?;
        // The vCPUs' state, read here: their threads are parked and let go of them.
        let mut vcpus = Vec::with_capacity(threads.len());
        for (id, t) in threads.iter().enumerate() {
            let model = self.cpu_models.get(id).cloned().unwrap_or_default();
            let id = u8::try_from(id)
                .map_err(|_| Error::Snapshot(format!("vCPU index {id} does not fit a u8")))?;
            let state =
                VcpuState::save(id, &t.parked_fd(), &self.vcpu_save, &model).map_err(|e| {
                    Error::Vcpu {
                        id,
                        reason: e.to_string(),
                    }
                })?;
            vcpus.push(state);
        }

        let regions = memory::layout_of(&self.mem);
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
        w.add(SectionKind::Platform, &platform).map_err(snap_err)?;
        for d in &devices {
            w.add(SectionKind::Device, d).map_err(snap_err)?;
        }
        Ok((copied, w))
    }

    /// Rebuilds a VM from the snapshot in `dir`, paused at the instant it was taken; run it
    /// with [`Vm::run`]. Host-side paths come from the snapshot unless `overrides` changes them.
    pub fn restore(dir: &Path, overrides: &RestoreOverrides) -> Result<Vm, Error> {
        Self::restore_from(Source::Dir(dir), overrides)
    }

    /// Like [`restore`](Self::restore), from a snapshot stream (see [`stream`]) read from `r`
    /// to its end; a damaged stream is refused before any vCPU exists.
    pub fn restore_stream(
        r: &mut dyn std::io::Read,
        overrides: &RestoreOverrides,
    ) -> Result<Vm, Error> {
        Self::restore_from(Source::Stream(StreamReader::new(r)), overrides)
    }

    /// Builds the VM a live migration will fill, before its state arrives, so that the
    /// guest's pause need not wait for KVM to create it: `config` is the configuration the
    /// source announced (host-side paths from `overrides`), `mem` the guest RAM the pages go
    /// into, laid out as `regions`. [`Vm::restore_prepared`] completes it.
    pub(crate) fn prepare_migrated(
        mem: GuestMem,
        regions: &[MemRegion],
        config: &VmConfig,
        overrides: &RestoreOverrides,
    ) -> Result<Prepared, Error> {
        let mut cfg = config.clone();
        apply_overrides(&mut cfg, overrides)?;
        cfg.validate().map_err(|e| Error::Config(e.to_string()))?;
        check_layout(regions, &cfg)?;
        Prepared::build(cfg, |_| Ok(mem))
    }

    /// Completes a [`Prepared`] VM with the migrated `state` (a `state.bin` container),
    /// checked exactly as a restore checks it: its configuration must be `config` (announced
    /// first) and its memory layout `regions` (the one the pages were sent for).
    pub(crate) fn restore_prepared(
        prepared: Prepared,
        state: &[u8],
        regions: &[MemRegion],
        config: &VmConfig,
    ) -> Result<Vm, Error> {
        let snap = decode_state(state)?;
        if snap.config != *config {
            return Err(Error::Snapshot(
                "the state's configuration is not the one the source announced".into(),
            ));
        }
        if snap.memory != *regions {
            return Err(Error::Snapshot(
                "the state's memory layout is not the one the pages were sent for".into(),
            ));
        }
        check_vcpu_sections(&snap, &prepared.cfg)?;
        prepared.complete(snap)
    }

    fn restore_from(mut source: Source<'_>, overrides: &RestoreOverrides) -> Result<Vm, Error> {
        let snap = match &mut source {
            Source::Dir(dir) => read_snapshot(dir)?,
            Source::Stream(r) => decode_state(&r.state()?)?,
        };
        let mut cfg = snap.config.clone();
        apply_overrides(&mut cfg, overrides)?;
        cfg.validate().map_err(|e| Error::Config(e.to_string()))?;
        check_vcpu_sections(&snap, &cfg)?;
        let prepared = Prepared::build(cfg, |cfg| match source {
            Source::Dir(dir) => match snap.digests.as_ref().filter(|d| d.memory_encrypted) {
                Some(d) => {
                    let cipher = memory_cipher(cfg)?.ok_or_else(|| {
                        Error::Snapshot(
                            "the snapshot's memory is encrypted but its VM has no encrypted disk"
                                .into(),
                        )
                    })?;
                    load_encrypted_memory(
                        &dir.join(MEMORY_FILE),
                        &snap.memory,
                        cfg,
                        &d.memory,
                        &cipher,
                    )
                }
                None => load_memory(
                    &dir.join(MEMORY_FILE),
                    &snap.memory,
                    cfg,
                    snap.digests.as_ref().map(|d| &d.memory),
                ),
            },
            Source::Stream(r) => r.memory(&snap.memory, cfg),
        })?;
        prepared.complete(snap)
    }
}

/// Whether the snapshot has one vCPU section per configured vCPU, in order.
fn check_vcpu_sections(snap: &Snapshot, cfg: &VmConfig) -> Result<(), Error> {
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
    Ok(())
}

/// A VM being restored, built as far as it goes without the saved state: the KVM VM, guest
/// RAM registered, the firmware mapped and the vCPUs created. Nothing runs in it yet.
pub(crate) struct Prepared {
    cfg: VmConfig,
    kvm: kvm_ioctls::Kvm,
    vm: Arc<kvm_ioctls::VmFd>,
    platform: arch::Platform,
    mem: GuestMem,
    firmware: Option<crate::firmware::RomHandle>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
}

impl Prepared {
    /// Creates the VM for `cfg` (the snapshot's configuration with the host's overrides);
    /// `memory` makes its RAM meanwhile (the irqchip is set up alongside).
    fn build(
        cfg: VmConfig,
        memory: impl FnOnce(&VmConfig) -> Result<GuestMem, Error>,
    ) -> Result<Prepared, Error> {
        let (kvm, vm) = create_kvm_vm(&cfg)?;
        let (platform, mem) = setup_vm_alongside(&vm, &cfg, || {
            let mem = memory(&cfg)?;
            register_memory(&vm, &mem)?;
            Ok(mem)
        })?;
        let firmware = cfg
            .firmware
            .as_deref()
            .map(|path| crate::firmware::remap(&vm, path))
            .transpose()?;
        // The vCPUs exist before the devices, as in `Vm::new` (on aarch64 an irqfd needs the
        // initialised vGIC); their state is restored after the devices'.
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        for id in 0..cfg.vcpus {
            let vcpu = vm
                .create_vcpu(id.into())
                .map_err(Error::kvm("create vCPU"))?;
            arch::setup_cpuid(&kvm, &vcpu, id, cfg.vcpus, &cfg.cpuid_hide)?;
            arch::prepare_vcpu(&platform, &vcpu, id).map_err(|e| Error::Vcpu {
                id,
                reason: e.to_string(),
            })?;
            vcpus.push(vcpu);
        }
        platform.vcpus_created()?;
        Ok(Prepared {
            cfg,
            kvm,
            vm,
            platform,
            mem,
            firmware,
            vcpus,
        })
    }

    /// Guest RAM, to be written before [`Prepared::complete`].
    pub(crate) fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// Builds the devices and puts the irqchip, the devices and the vCPUs in `snap`'s state
    /// (its vCPU sections already checked against the configuration).
    fn complete(self, snap: Snapshot) -> Result<Vm, Error> {
        let Prepared {
            cfg,
            kvm,
            vm,
            platform,
            mem,
            firmware,
            vcpus,
        } = self;
        // aarch64: the vGIC and its ITS, before any device could raise an interrupt.
        snap.vm_state.restore_irqchip(&platform, cfg.vcpus)?;
        let exit = Arc::new(ExitSignal::new().map_err(Error::io("create exit event"))?);
        let devs = build_devices(&cfg, &vm, &mem, &exit, Some(&snap.serial))?;
        if let Some(saved) = &snap.platform {
            devs.legacy.restore_platform(saved)?;
        }
        let sections = if snap.positional.is_empty() {
            snap.devices
        } else if snap.devices.is_empty() {
            let saved = snap.positional.into_iter().map(|v| (v.index, v.state));
            devs.virtio.name_positional(saved.collect())?
        } else {
            return Err(Error::Snapshot(
                "the snapshot mixes devices by id and by position".into(),
            ));
        };
        devs.virtio.restore(&sections)?;
        lock(&devs.root).refresh_all();
        devs.hooks
            .apply_deferred()
            .map_err(Error::io("install IRQ routes"))?;

        snap.vm_state.restore(&vm)?;

        let mut cpu_models = Vec::with_capacity(snap.vcpus.len());
        for (st, vcpu) in snap.vcpus.iter().zip(&vcpus) {
            let vcpu_err = |e: arch::Error| Error::Vcpu {
                id: st.id,
                reason: e.to_string(),
            };
            st.restore_cpu_model(vcpu).map_err(vcpu_err)?;
            st.restore(vcpu).map_err(vcpu_err)?;
            // A snapshot without a CPU model keeps the one this host gave the new vCPU.
            cpu_models.push(match st.cpu_model() {
                Some(model) => model,
                None => CpuModel::read(vcpu).map_err(vcpu_err)?,
            });
        }
        devs.virtio.renotify();
        let mut restored =
            Vm::assemble(cfg, kvm, vm, mem, exit, devs, (vcpus, cpu_models, platform));
        restored._firmware = firmware;
        Ok(restored)
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
    if o.disk_keys.len() > cfg.disks.len() {
        return Err(Error::Config(format!(
            "{} disk keys given, the snapshot has {} disks",
            o.disk_keys.len(),
            cfg.disks.len()
        )));
    }
    for (d, k) in cfg.disks.iter_mut().zip(&o.disk_keys) {
        if k.is_some() {
            d.key = k.clone();
        }
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
    if o.macs.len() > cfg.net.len() {
        return Err(Error::Config(format!(
            "{} MAC addresses given, the snapshot has {} network devices",
            o.macs.len(),
            cfg.net.len()
        )));
    }
    for (n, m) in cfg.net.iter_mut().zip(&o.macs) {
        n.mac = Some(vmm_api::config::format_mac(m));
    }
    if let Some(p) = &o.vsock_socket {
        match &mut cfg.vsock {
            Some(v) => v.socket = p.clone(),
            None => return Err(Error::Config("the snapshot has no vsock device".into())),
        }
    }
    if let Some(cid) = o.vsock_cid {
        match &mut cfg.vsock {
            Some(v) => v.cid = cid,
            None => return Err(Error::Config("the snapshot has no vsock device".into())),
        }
    }
    Ok(())
}

/// The text of the `COMPLETE` marker.
const COMPLETE_TEXT: &[u8] = b"pocketvisor snapshot v1\n";

/// The `digests` section: what the other files of a directory snapshot must hash to.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FileDigests {
    /// `memory.bin`, piece by piece (of the plaintext when it is encrypted).
    memory: MemoryDigests,
    /// SHA-256 of `config.json`, lower-case hex.
    config_json: String,
    /// `memory.bin` is encrypted ([`memory_cipher`]); absent in older snapshots: false.
    #[serde(default)]
    memory_encrypted: bool,
}

/// The cipher of the snapshot memory of a VM with an encrypted disk: a key derived from the
/// first encrypted disk's (HMAC-SHA512, its own label), so whoever may read the disks may
/// read the memory, and nobody else. None for a VM without one.
fn memory_cipher(cfg: &VmConfig) -> Result<Option<MemoryCipher>, Error> {
    use devices::virtio::block::crypt::DiskKey;
    use hmac::{Hmac, Mac};
    let Some(d) = cfg.disks.iter().find(|d| d.encrypted) else {
        return Ok(None);
    };
    let key = d.key.as_ref().ok_or_else(|| {
        Error::Snapshot(
            "the snapshot's memory is encrypted under the disks' key, and none was given              (--disk-keys-stdin)"
                .into(),
        )
    })?;
    let mut mac = <Hmac<sha2::Sha512> as Mac>::new_from_slice(key.as_bytes())
        .map_err(|e| Error::Snapshot(format!("memory key: {e}")))?;
    mac.update(b"pocketvisor snapshot memory v1");
    let mut bytes = mac.finalize().into_bytes();
    let derived =
        DiskKey::from_slice(&bytes).map_err(|e| Error::Snapshot(format!("memory key: {e}")));
    zeroize::Zeroize::zeroize(bytes.as_mut_slice());
    Ok(Some(MemoryCipher::new(&derived?)))
}

/// The decoded contents of `state.bin`.
struct Snapshot {
    /// The digests of the other files (None: a stream, or a snapshot written before them).
    digests: Option<FileDigests>,
    config: VmConfig,
    memory: Vec<MemRegion>,
    vcpus: Vec<VcpuState>,
    vm_state: VmState,
    serial: SerialState,
    /// The platform devices besides the UART (None: written before they were saved).
    platform: Option<PlatformState>,
    /// The devices by id.
    devices: Vec<DeviceSection>,
    /// The devices by position (older snapshots).
    positional: Vec<VirtioSection>,
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

/// The guest memory of the snapshot in `dir` (checked against its digests), for a migration
/// that starts from it: its layout and configuration must be `regions` and `config`, those
/// the source announced. A snapshot with encrypted memory is refused (its key is not here).
pub(crate) fn base_memory(
    dir: &Path,
    regions: &[MemRegion],
    config: &VmConfig,
) -> Result<GuestMem, Error> {
    let snap = read_snapshot(dir)?;
    if snap.memory != regions || snap.config.memory_mib != config.memory_mib {
        return Err(Error::Snapshot(format!(
            "the base {} is not a copy of this guest (another memory layout)",
            dir.display()
        )));
    }
    if snap.digests.as_ref().is_some_and(|d| d.memory_encrypted) {
        return Err(Error::Snapshot(
            "a base with encrypted memory cannot be used yet".into(),
        ));
    }
    load_memory(
        &dir.join(MEMORY_FILE),
        regions,
        config,
        snap.digests.as_ref().map(|d| &d.memory),
    )
}

/// Reads and checks a snapshot directory's `state.bin` (after its `COMPLETE` marker) and,
/// by the digests in it, `config.json` (`memory.bin` is checked when it is mapped).
fn read_snapshot(dir: &Path) -> Result<Snapshot, Error> {
    let marker = dir.join(COMPLETE_FILE);
    match std::fs::read(&marker) {
        Ok(text) if text == COMPLETE_TEXT => {}
        Ok(_) => {
            return Err(Error::Snapshot(format!(
                "{} is damaged (unexpected contents)",
                marker.display()
            )))
        }
        Err(_) => {
            return Err(Error::Snapshot(format!(
                "{} is not a complete snapshot (no {COMPLETE_FILE} marker)",
                dir.display()
            )))
        }
    }
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io_err("cannot read", &path))?;
    let snap = decode_state(&bytes)
        .map_err(|e| Error::Snapshot(format!("{}: {e}; nothing was restored", path.display())))?;
    if let Some(d) = &snap.digests {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read(&path).map_err(io_err("cannot read", &path))?;
        if format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&text)) != d.config_json {
            return Err(Error::Snapshot(format!(
                "{} is damaged (it does not match its saved digest); nothing was restored",
                path.display()
            )));
        }
    }
    Ok(snap)
}

/// Checks a `state.bin` container (and its architecture) and decodes its sections.
fn decode_state(bytes: &[u8]) -> Result<Snapshot, Error> {
    let sections = format::read(bytes)?;
    check_arch(&sections)?;
    let all = |kind| sections.iter().filter(move |s: &&Section| s.kind == kind);
    let mut digests = all(SectionKind::Digests);
    let digests = match (digests.next(), digests.next()) {
        (None, _) => None,
        (Some(s), None) => Some(s.decode()?),
        _ => return Err(FormatError::Missing(SectionKind::Digests.name()).into()),
    };
    let mut platform = all(SectionKind::Platform);
    let platform = match (platform.next(), platform.next()) {
        (None, _) => None,
        (Some(s), None) => Some(s.decode()?),
        _ => return Err(FormatError::Missing(SectionKind::Platform.name()).into()),
    };
    Ok(Snapshot {
        digests,
        config: one(&sections, SectionKind::Config)?.decode()?,
        memory: one(&sections, SectionKind::Memory)?.decode()?,
        vcpus: all(SectionKind::Vcpu)
            .map(|s| s.decode())
            .collect::<Result<_, _>>()?,
        vm_state: one(&sections, SectionKind::VmState)?.decode()?,
        serial: one(&sections, SectionKind::Serial)?.decode()?,
        platform,
        devices: all(SectionKind::Device)
            .map(|s| s.decode())
            .collect::<Result<_, _>>()?,
        positional: all(SectionKind::VirtioPci)
            .map(|s| s.decode())
            .collect::<Result<_, _>>()?,
    })
}

/// The configuration and memory layout a state container (`state.bin`) describes, checked
/// as a restore checks it (container, architecture, every section).
pub(crate) fn describe_state(state: &[u8]) -> Result<(VmConfig, Vec<MemRegion>), Error> {
    let snap = decode_state(state)?;
    check_vcpu_sections(&snap, &snap.config)?;
    Ok((snap.config, snap.memory))
}

/// Completes a snapshot directory whose `memory.bin` is written (a replica's recovery): the
/// state container `state`, `config.json` and the `COMPLETE` marker, each synced. The
/// container has no digests section: its memory was authenticated as it was rebuilt.
pub(crate) fn write_recovered(dir: &Path, state: &[u8], config: &VmConfig) -> Result<(), Error> {
    let cfg_json = serde_json::to_vec_pretty(config).map_err(snap_err)?;
    write_atomic(dir, STATE_FILE, |mut f, p| {
        f.write_all(state).map_err(io_err("cannot write", p))
    })?;
    write_atomic(dir, CONFIG_FILE, |mut f, p| {
        f.write_all(&cfg_json).map_err(io_err("cannot write", p))
    })?;
    sync_dir(dir)?;
    write_atomic(dir, COMPLETE_FILE, |mut f, p| {
        f.write_all(COMPLETE_TEXT)
            .map_err(io_err("cannot write", p))
    })?;
    sync_dir(dir)
}

/// Checks a snapshot directory without building a VM: the marker, the container and every
/// section decode, and `memory.bin` against its digests unless it is encrypted (then its
/// digests are of the plaintext, checked as the restore decrypts it). Returns the saved
/// configuration.
pub fn inspect(dir: &Path) -> Result<VmConfig, Error> {
    let snap = read_snapshot(dir)?;
    if let Some(d) = snap.digests.as_ref().filter(|d| !d.memory_encrypted) {
        verify_memory(&dir.join(MEMORY_FILE), &snap.memory, &d.memory)?;
    }
    Ok(snap.config)
}

#[cfg(test)]
mod tests {
    use super::memory::PAGE;
    use super::*;
    use arch::layout;
    use devices::GuestMem;
    use vm_memory::{Bytes, GuestAddress};

    fn sections_with_arch(tags: &[&str]) -> Vec<Section> {
        let mut w = Writer::new();
        for t in tags {
            w.add(SectionKind::Arch, t).unwrap();
        }
        w.add(SectionKind::Config, &"cfg").unwrap();
        format::read(&w.finish()).unwrap()
    }

    #[test]
    fn a_clones_overrides_change_its_tap_and_mac_and_keep_its_network_policy() {
        use vmm_api::config::{FilterAction, NetConfig, NetFilterConfig};
        let policy = NetFilterConfig {
            default: FilterAction::Deny,
            rules: Vec::new(),
            dns_servers: Vec::new(),
        };
        let mut cfg: VmConfig = toml::from_str("kernel = \"k\"").unwrap();
        cfg.net.push(NetConfig {
            tap: "tap0".into(),
            mac: Some("02:00:00:00:00:01".into()),
            filter: Some(policy.clone()),
        });
        let o = RestoreOverrides {
            taps: vec!["pvt0123456789ab".into()],
            macs: vec![[0x06, 1, 2, 3, 4, 5]],
            ..Default::default()
        };
        apply_overrides(&mut cfg, &o).unwrap();
        assert_eq!(cfg.net[0].tap, "pvt0123456789ab");
        assert_eq!(cfg.net[0].mac.as_deref(), Some("06:01:02:03:04:05"));
        assert_eq!(cfg.net[0].filter, Some(policy));
        let two = RestoreOverrides {
            macs: vec![[6, 0, 0, 0, 0, 1], [6, 0, 0, 0, 0, 2]],
            ..Default::default()
        };
        assert!(apply_overrides(&mut cfg, &two).is_err());
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
        let mut digests = MemoryDigests::default();
        write_atomic(&dir, MEMORY_FILE, |f, p| {
            (regions, written, digests) = save_memory(&mem, f, p, None)?;
            Ok(())
        })
        .unwrap();
        // Three non-zero pages: 0x1000 and the two (three with the tail) around 0x300ff0.
        assert_eq!(written, 4 * PAGE as u64);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "zero pages were written");

        assert_eq!(digests.sha256.len(), 64);
        let back = load_memory(&path, &regions, &cfg, Some(&digests)).unwrap();
        let mut b = [0u8; 5];
        back.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        let mut c = [0u8; 5000];
        back.read_slice(&mut c, GuestAddress(0x30_0ff0)).unwrap();
        assert!(c.iter().all(|&x| x == 7));
        // Writes go to the private copy, never to the file.
        back.write_slice(b"XXXXX", GuestAddress(0x1000)).unwrap();
        let again = load_memory(&path, &regions, &cfg, Some(&digests)).unwrap();
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
        let mut digests2 = MemoryDigests::default();
        write_atomic(&again_dir, MEMORY_FILE, |f, p| {
            (_, written2, digests2) = save_memory(&back, f, p, None)?;
            Ok(())
        })
        .unwrap();
        assert_eq!(written2, 5 * PAGE as u64);
        let third = load_memory(
            &again_dir.join(MEMORY_FILE),
            &regions,
            &cfg,
            Some(&digests2),
        )
        .unwrap();
        third.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"XXXXX");
        third.read_slice(&mut c, GuestAddress(0x30_0ff0)).unwrap();
        assert!(c.iter().all(|&x| x == 7));
        // One flipped bit in a data page, or a byte written into a hole: refused with where.
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        for (at, old, new) in [(0x1001u64, b'e', b'e' ^ 1), (0x10_0000, 0, 1)] {
            f.write_all_at(&[new], at).unwrap();
            let e = load_memory(&path, &regions, &cfg, Some(&digests))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("damaged") && e.contains("0x"), "{e}");
            f.write_all_at(&[old], at).unwrap();
        }
        load_memory(&path, &regions, &cfg, Some(&digests)).unwrap();
        // A layout that does not fit the configuration is refused.
        cfg.memory_mib = 128;
        assert!(load_memory(&path, &regions, &cfg, None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
