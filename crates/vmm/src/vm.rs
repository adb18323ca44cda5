//! Building and running one VM.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use arch::{layout, CpuModel, VcpuSaveContext};
use devices::bus::{lock, Bus};
use devices::legacy::{ExitSignal, GuestExit, Serial, SerialState};
use devices::pci::{PciConfigMmio, PciMmioWindow, PciRoot, VmHooks};
use devices::GuestMem;

use crate::config::{SerialConfig, VmConfig};
use crate::control::{Controller, Request, RequestError};
use crate::device_manager::DeviceManager;
use crate::hooks::KvmHooks;
use crate::memory::{create_memory, mark_mergeable, DirtyLog, DirtyRegion};
use crate::vcpu::{self, VcpuMsg, VcpuShared, VcpuThread};
use crate::Error;

/// The balloon's device id (memory statistics include its state).
const BALLOON_ID: &str = "balloon";
/// The serial port's id in device requests.
const SERIAL_ID: &str = vmm_api::control::SERIAL_DEVICE_ID;
// The wire limit is the port's.
const _: () = assert!(vmm_api::control::SERIAL_INPUT_MAX == devices::legacy::INPUT_REQUEST_MAX);

/// How long a `stats` request waits for the guest's balloon driver to send fresh statistics.
const STATS_WAIT: Duration = Duration::from_millis(200);

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest ended the VM.
    Guest(GuestExit),
    /// The caller asked the VM to stop.
    Stopped,
    /// The VM was migrated to another host and runs there now.
    Migrated,
}

/// A VM ready to run.
pub struct Vm {
    pub(crate) cfg: VmConfig,
    pub(crate) vcpus: Vec<VcpuFd>,
    /// vCPU threads started ahead of the run and parked (a migration's destination, see
    /// [`Vm::start_vcpus_parked`]); `vcpus` is then empty.
    pub(crate) parked: Vec<VcpuThread>,
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) exit: Arc<ExitSignal>,
    /// Kept open for as long as the VM exists.
    pub(crate) _kvm: Kvm,
    pub(crate) vm: Arc<VmFd>,
    pub(crate) mem: GuestMem,
    pub(crate) serial: Arc<Mutex<Serial>>,
    /// Waits for the serial log file to hold what the guest printed (a file log only).
    pub(crate) serial_log: Option<crate::serial_log::Drain>,
    /// The platform devices (snapshots save their state).
    pub(crate) legacy: arch::LegacyDevices,
    /// The PCI bus (the buses hold it too).
    pub(crate) _root: Arc<Mutex<PciRoot>>,
    /// The virtio devices, by id.
    pub(crate) devices: DeviceManager,
    /// What saving a vCPU needs to know about this host and VM (read before any sandbox).
    pub(crate) vcpu_save: VcpuSaveContext,
    /// Each vCPU's CPU model (x86_64: CPUID and TSC frequency), read when it was built.
    pub(crate) cpu_models: Vec<CpuModel>,
    /// Which pages of guest RAM changed.
    pub(crate) dirty: DirtyLog,
    /// Whether the dirty logs have run since a replica's last checkpoint (the next one may
    /// then hold only what changed); cleared by a migration, which takes them.
    pub(crate) checkpointed: std::sync::atomic::AtomicBool,
    /// The architecture's platform devices as KVM holds them (aarch64: the vGIC and ITS).
    pub(crate) _platform: arch::Platform,
    /// The firmware ROM mapped into the VM, when it boots firmware.
    pub(crate) _firmware: Option<crate::firmware::RomHandle>,
}

/// KVM and a new VM fd, after checking the configuration against the host. The
/// architecture's part (x86_64: irqchip and PIT) comes with [`setup_vm_alongside`].
pub(crate) fn create_kvm_vm(cfg: &VmConfig) -> Result<(Kvm, Arc<VmFd>), Error> {
    let kvm = Kvm::new().map_err(Error::KvmOpen)?;
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(cfg.vcpus) > max_vcpus {
        return Err(Error::Config(format!(
            "{} vCPUs asked, this host's KVM allows {max_vcpus}",
            cfg.vcpus
        )));
    }
    check_host_memory(cfg.memory_mib)?;
    arch::validate_cpuid_hide(&cfg.cpuid_hide)?;
    let vm = Arc::new(kvm.create_vm().map_err(Error::kvm("create VM"))?);
    Ok((kvm, vm))
}

/// Sets up the architecture's part of `vm` for `cfg` (x86_64: TSS, irqchip, PIT) on a helper thread
/// while `memory` (allocating or mapping guest RAM and registering its KVM slots) runs on
/// this one. Each side waits in the kernel for its own grace period (irq routing, memory
/// slots), a few milliseconds each on a virtualized host, so together they take the longer
/// of the two rather than the sum. Returns the platform and what `memory` made once both are
/// done.
pub(crate) fn setup_vm_alongside<T>(
    vm: &VmFd,
    cfg: &VmConfig,
    memory: impl FnOnce() -> Result<T, Error>,
) -> Result<(arch::Platform, T), Error> {
    let boots_firmware = cfg.firmware.is_some();
    std::thread::scope(|scope| {
        let arch = std::thread::Builder::new()
            .name("vm-setup".into())
            .spawn_scoped(scope, || arch::setup_vm(vm, boots_firmware))
            .map_err(Error::io("start the VM setup thread"))?;
        let made = memory();
        let platform = arch
            .join()
            .map_err(|_| Error::Memory("the VM setup thread panicked".into()))??;
        Ok((platform, made?))
    })
}

impl Vm {
    /// Builds the VM described by `cfg`: memory, irqchip, devices, kernel, vCPUs.
    pub fn new(cfg: &VmConfig) -> Result<Vm, Error> {
        cfg.validate().map_err(|e| Error::Config(e.to_string()))?;
        // A MAC left to chance is chosen now and kept in the configuration, so a snapshot
        // restores the same address the guest knows.
        let mut cfg = cfg.clone();
        for n in cfg.net.iter_mut().filter(|n| n.mac.is_none()) {
            let m = devices::virtio::net::random_mac().map_err(Error::io("random MAC"))?;
            n.mac = Some(vmm_api::config::format_mac(&m));
        }
        let cfg = &cfg;
        let (kvm, vm) = create_kvm_vm(cfg)?;
        let (platform, mem) =
            setup_vm_alongside(&vm, cfg, || create_memory(&vm, cfg.memory_mib << 20))?;
        let (boot, firmware) = match &cfg.firmware {
            Some(path) => {
                let (rom, boot) = crate::firmware::load(&vm, &mem, path)?;
                (boot, Some(rom))
            }
            None => (load_kernel(cfg, &mem)?, None),
        };

        let mut vcpus = Vec::with_capacity(cfg.vcpus.into());
        let mut cpu_models = Vec::with_capacity(cfg.vcpus.into());
        for id in 0..cfg.vcpus {
            let vcpu = vm
                .create_vcpu(id.into())
                .map_err(Error::kvm("create vCPU"))?;
            arch::setup_cpuid(&kvm, &vcpu, id, cfg.vcpus, &cfg.cpuid_hide)?;
            arch::setup_vcpu(&platform, &vcpu, id, &boot, &mem)?;
            let model = CpuModel::read(&vcpu).map_err(|e| Error::Vcpu {
                id,
                reason: e.to_string(),
            })?;
            cpu_models.push(model);
            vcpus.push(vcpu);
        }
        // The vCPUs exist before the devices: on aarch64 an irqfd needs an initialised vGIC,
        // which needs every vCPU.
        platform.vcpus_created()?;
        let exit = Arc::new(ExitSignal::new().map_err(Error::io("create exit event"))?);
        let devs = build_devices(cfg, &vm, &mem, &exit, None)?;
        let mut built = Vm::assemble(
            cfg.clone(),
            kvm,
            vm,
            mem,
            exit,
            devs,
            (vcpus, cpu_models, platform),
        );
        built._firmware = firmware;
        Ok(built)
    }

    /// Puts the parts together.
    pub(crate) fn assemble(
        cfg: VmConfig,
        kvm: Kvm,
        vm: Arc<VmFd>,
        mem: GuestMem,
        exit: Arc<ExitSignal>,
        devs: Devices,
        (vcpus, cpu_models, platform): (Vec<VcpuFd>, Vec<CpuModel>, arch::Platform),
    ) -> Vm {
        let vcpu_save = VcpuSaveContext::new(&kvm, &vm);
        if cfg.mergeable {
            mark_mergeable(&mem);
        }
        let shared = Arc::new(VcpuShared {
            pio: devs.pio,
            mmio: devs.mmio,
            exit: exit.clone(),
            stop: Default::default(),
            pause: Default::default(),
            parked: Default::default(),
            error: Mutex::new(None),
            split_string_io: cfg.firmware.is_some(),
        });
        let dirty = DirtyLog::new(vm.clone(), mem.clone());
        Vm {
            cfg,
            vcpus,
            parked: Vec::new(),
            shared,
            exit,
            _kvm: kvm,
            vm,
            mem,
            serial: devs.serial,
            serial_log: devs.serial_log,
            legacy: devs.legacy,
            _root: devs.root,
            devices: devs.virtio,
            vcpu_save,
            cpu_models,
            dirty,
            checkpointed: Default::default(),
            _platform: platform,
            _firmware: None,
        }
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// The host's handles on the VM's screen and input devices (for a VNC server), if it
    /// has a gpu.
    pub fn screen(&self) -> Option<crate::device_manager::ScreenHandles> {
        self.devices.screen()
    }

    /// Guest RAM (a clone sharing the same memory and dirty bitmaps).
    pub fn guest_memory(&self) -> GuestMem {
        self.mem.clone()
    }

    /// The VM's dirty page tracking, usable from any thread while the VM runs.
    pub fn dirty_log(&self) -> DirtyLog {
        self.dirty.clone()
    }

    /// The pages of guest RAM that changed since the last call, and clears the record (see
    /// [`DirtyLog::dirty_pages`]; guest writes are only seen after [`DirtyLog::start`]).
    pub fn dirty_pages(&self) -> Result<Vec<DirtyRegion>, Error> {
        self.dirty.dirty_pages()
    }

    /// Runs the guest until it exits, a vCPU fails, or `stop` becomes readable.
    pub fn run(self, stop: &EventFd) -> Result<RunOutcome, Error> {
        self.run_with_control(stop, None)
    }

    /// Like [`run`](Self::run), also serving requests sent through `control`.
    pub fn run_with_control(
        mut self,
        stop: &EventFd,
        control: Option<&Controller>,
    ) -> Result<RunOutcome, Error> {
        let threads = if self.parked.is_empty() {
            self.spawn_vcpus()?
        } else {
            let threads = std::mem::take(&mut self.parked);
            self.shared.pause.store(false, Ordering::Release);
            for t in &threads {
                t.send(VcpuMsg::Resume);
            }
            threads
        };

        let control_fd = control.map(|c| c.event.as_raw_fd());
        let mut migrated = false;
        let stopped = loop {
            let fired = wait_readable(&[
                Some(self.exit.event.as_raw_fd()),
                Some(stop.as_raw_fd()),
                control_fd,
            ])
            .map_err(Error::io("wait for the VM"))?;
            match fired {
                0 => break false,
                1 => break true,
                _ => {
                    let Some(control) = control else { continue };
                    let mut stop_now = false;
                    for (req, reply) in control.take() {
                        stop_now |= req == Request::Stop;
                        let answer = self.handle_request(&threads, &req);
                        // A clone's source runs on; a move's ends.
                        migrated |=
                            matches!(req, Request::Migrate { clone: false, .. }) && answer.is_ok();
                        let _ = reply.send(answer);
                        if migrated {
                            break;
                        }
                    }
                    if stop_now || migrated {
                        break true;
                    }
                }
            }
        };

        if migrated {
            yield_to_the_destination();
        }
        self.shared.stop.store(true, Ordering::Release);
        // A kick can land just before a thread enters KVM_RUN; keep kicking until all are gone.
        while threads.iter().any(|t| !t.handle.is_finished()) {
            threads.iter().for_each(|t| t.kick());
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in threads {
            let _ = t.handle.join();
        }
        // Device workers left paused are released (and stopped) when the devices drop.

        if let Some((id, reason)) = lock(&self.shared.error).take() {
            return Err(Error::Vcpu { id, reason });
        }
        if migrated {
            return Ok(RunOutcome::Migrated);
        }
        match self.exit.reason() {
            Some(e) => Ok(RunOutcome::Guest(e)),
            None if stopped => Ok(RunOutcome::Stopped),
            None => Err(Error::Vcpu {
                id: 0,
                reason: "stopped without a reason".into(),
            }),
        }
    }
}

impl Vm {
    fn spawn_vcpus(&mut self) -> Result<Vec<VcpuThread>, Error> {
        vcpu::install_kick_handler().map_err(Error::io("install vCPU kick handler"))?;
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (id, fd) in self.vcpus.drain(..).enumerate() {
            let id = u8::try_from(id).map_err(|_| Error::Config(format!("vCPU {id}: too many")))?;
            let t =
                vcpu::spawn(id, fd, self.shared.clone()).map_err(Error::io("spawn vCPU thread"))?;
            threads.push(t);
        }
        Ok(threads)
    }

    /// Starts the vCPU threads now, parked until [`Vm::run_with_control`] runs the guest: a
    /// migration's destination does this before it answers `Ready`, so the guest's first
    /// instructions after `Commit` wait for a thread to wake, not for one to be created
    /// (which the scheduler makes wait a full time slice on a busy host). A VM dropped
    /// before it runs stops them. Not in a jailed VMM ([`devices::threads::may_start_early`]).
    pub(crate) fn start_vcpus_parked(&mut self) -> Result<(), Error> {
        // A jailed VMM's threads start after it drops its privileges, at the run.
        if !devices::threads::may_start_early() {
            return Ok(());
        }
        self.shared.pause.store(true, Ordering::Release);
        self.parked = self.spawn_vcpus()?;
        Ok(())
    }
}

/// Lowers the calling thread (the one that drops the VM and ends the process) to the lowest
/// priority: once the guest runs at the destination, which may be on this host, unmapping
/// its RAM here must not hold a CPU the destination's threads wake up on (traced: the first
/// output of a migrated guest waited up to 3.6 ms for the destination's serial log thread
/// while the source freed 512 MiB on a 2-core host). The jail's allowlist lets exactly this
/// call through.
fn yield_to_the_destination() {
    // SAFETY: setpriority(2) with integer arguments only; the calling thread (who 0).
    unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, 19) };
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        self.shared.stop.store(true, Ordering::Release);
        for t in self.parked.drain(..) {
            t.send(VcpuMsg::Resume);
            let _ = t.handle.join();
        }
    }
}

impl Vm {
    /// Serves one control request on the thread running the VM.
    fn handle_request(
        &self,
        threads: &[VcpuThread],
        req: &Request,
    ) -> Result<String, RequestError> {
        match req {
            Request::Pause => self.pause(threads).map(|_| "paused".into()),
            Request::Resume => {
                self.resume(threads);
                Ok("running".into())
            }
            Request::Snapshot { dir, resume } => {
                let was_paused = self.shared.pause.load(Ordering::Acquire);
                self.pause(threads)?;
                let result = self
                    .save_snapshot(threads, dir)
                    .map_err(RequestError::Snapshot);
                // A failed snapshot (a full disk) leaves the guest as it was before.
                if *resume || (result.is_err() && !was_paused) {
                    self.resume(threads);
                }
                result.map(|stats| stats.to_string())
            }
            Request::SnapshotStream { socket, resume } => {
                // No write timeout: setsockopt is not in the jail's seccomp list. A receiver
                // that stops reading holds the VM paused until it reads or closes.
                let mut conn =
                    std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
                        RequestError::Connect {
                            path: socket.clone(),
                            source,
                        }
                    })?;
                let was_paused = self.shared.pause.load(Ordering::Acquire);
                self.pause(threads)?;
                let result = self
                    .send_snapshot(threads, &mut conn)
                    .map_err(RequestError::Snapshot);
                if *resume || (result.is_err() && !was_paused) {
                    self.resume(threads);
                }
                result.map(|stats| stats.to_string())
            }
            Request::Migrate {
                to,
                key_file,
                downtime_ms,
                tls,
                twin,
                keep,
                clone,
            } => {
                let key = crate::migration::wire::read_key(key_file)
                    .map_err(|e| RequestError::Migration(Error::Migration(e)))?;
                let opts = crate::migration::MigrateOptions {
                    to: to.clone(),
                    key,
                    downtime: Duration::from_millis(*downtime_ms),
                    tls: tls.clone(),
                    request: twin.as_ref().map(|name| {
                        let verb = if *clone { "clone" } else { "offload" };
                        format!("{verb} {name}")
                    }),
                    keep: keep.clone(),
                    clone: *clone,
                };
                self.migrate_out(threads, &opts)
                    .map(|stats| stats.to_string())
                    .map_err(RequestError::Migration)
            }
            Request::Checkpoint { dir, full } => self
                .checkpoint(threads, dir, *full)
                .map(|stats| stats.to_string())
                .map_err(RequestError::Snapshot),
            Request::Stop => Ok("stopping".into()),
            Request::Stats => Ok(self.memory_stats()),
            Request::Device { id, request } if id == SERIAL_ID => lock(&self.serial)
                .control(request)
                .map(|answer| answer.to_string())
                .map_err(RequestError::from),
            Request::Device { id, request } => self
                .devices
                .control(id, request)
                .map(|answer| answer.to_string())
                .map_err(RequestError::from),
        }
    }

    /// Guest RAM and the balloon's state as JSON, with statistics fresh from the guest if its
    /// driver answers within [`STATS_WAIT`] (else the last ones it sent).
    fn memory_stats(&self) -> String {
        let balloon = self.devices.has(BALLOON_ID).then(|| {
            let ask = serde_json::json!({"op": "stats", "wait_ms": STATS_WAIT.as_millis()});
            self.devices
                .control(BALLOON_ID, &ask)
                .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
        });
        let stats = vmm_api::MemoryStats {
            memory_mib: self.cfg.memory_mib,
            mergeable: self.cfg.mergeable,
            balloon,
        };
        serde_json::to_string(&stats).unwrap_or_default()
    }

    /// Parks every vCPU outside KVM_RUN, then quiesces the device workers; the serial log
    /// file then holds everything the guest printed before the pause.
    pub(crate) fn pause(&self, threads: &[VcpuThread]) -> Result<(), RequestError> {
        if self.shared.pause.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // A kicked vCPU parks within microseconds, and the last one to park wakes this
        // thread; a kick that came just before a vCPU entered KVM_RUN is repeated after 20 us,
        // then twice as long each time, up to 1 ms (a fixed 1 ms wait made every pause, and
        // so every migration's downtime, at least 1 ms).
        let n = threads.len();
        let mut wait = Duration::from_micros(20);
        while self.shared.parked.get() < n {
            if threads.iter().any(|t| t.handle.is_finished()) {
                self.resume(threads);
                return Err(RequestError::VcpuStopped);
            }
            if std::time::Instant::now() > deadline {
                self.resume(threads);
                return Err(RequestError::PauseTimeout);
            }
            threads.iter().for_each(|t| t.kick());
            self.shared.parked.wait_until(wait, |p| p >= n);
            wait = (wait * 2).min(Duration::from_millis(1));
        }
        self.devices.pause();
        if let Some(log) = &self.serial_log {
            log.wait(Duration::from_secs(1));
        }
        Ok(())
    }

    /// Lets devices and vCPUs run again.
    pub(crate) fn resume(&self, threads: &[VcpuThread]) {
        if !self.shared.pause.swap(false, Ordering::AcqRel) {
            return;
        }
        self.devices.resume();
        for t in threads {
            t.send(VcpuMsg::Resume);
        }
        // Wait until they have left the parked state so a new pause counts afresh.
        self.shared
            .parked
            .wait_until(Duration::from_secs(1), |p| p == 0);
    }
}

/// Opens a kernel or initrd: a regular file, never waiting on a FIFO or reading a device.
pub(crate) fn open(path: &Path) -> Result<File, Error> {
    hostfs::open_regular(path, false).map_err(|source| Error::File {
        path: path.display().to_string(),
        source,
    })
}

/// Loads the kernel, initrd and command line of `cfg` into `mem`; returns where vCPU 0 starts.
fn load_kernel(cfg: &VmConfig, mem: &GuestMem) -> Result<arch::BootSetup, Error> {
    let mut kernel = open(&cfg.kernel)?;
    let mut initrd = cfg.initrd.as_deref().map(open).transpose()?;
    let boot_cfg = arch::BootConfig {
        cmdline: &cfg.cmdline,
        nr_vcpus: cfg.vcpus,
        mem_size: cfg.memory_mib << 20,
        pci: arch::PciInfo {
            ecam_base: layout::PCI_ECAM_START,
            ecam_size: layout::PCI_ECAM_SIZE,
            mmio_base: layout::PCI_MMIO_START,
            mmio_size: layout::PCI_MMIO_SIZE,
        },
    };
    Ok(arch::load_kernel(
        mem,
        &mut kernel,
        initrd.as_mut(),
        &boot_cfg,
    )?)
}

/// Refuses guests larger than the host's RAM.
fn check_host_memory(mib: u64) -> Result<(), Error> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages > 0 && page > 0 {
        let host_mib = (pages as u64 * page as u64) >> 20;
        if mib > host_mib {
            return Err(Error::Config(format!(
                "memory {mib} MiB is more than this host has ({host_mib} MiB)"
            )));
        }
    }
    Ok(())
}

/// The devices of a VM and the buses they sit on.
pub(crate) struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub serial: Arc<Mutex<Serial>>,
    /// The serial log file's drain, when the serial port writes to a file.
    pub serial_log: Option<crate::serial_log::Drain>,
    /// The platform devices, for their snapshot state.
    pub legacy: arch::LegacyDevices,
    pub root: Arc<Mutex<PciRoot>>,
    pub virtio: DeviceManager,
    /// With `serial_state` given (a restore), the IRQ routes wait for
    /// [`KvmHooks::apply_deferred`].
    pub hooks: Arc<KvmHooks>,
}

/// Builds the port and MMIO buses with every device the configuration asks for; the serial
/// port starts in the state `serial_state` if given (restore).
pub(crate) fn build_devices(
    cfg: &VmConfig,
    vm: &Arc<VmFd>,
    mem: &GuestMem,
    exit: &Arc<ExitSignal>,
    serial_state: Option<&SerialState>,
) -> Result<Devices, Error> {
    let hooks = Arc::new(KvmHooks::new(vm.clone(), layout::MSI_GSI_BASE));
    if serial_state.is_some() {
        hooks.defer_routes();
    } else {
        hooks
            .install_default_routes()
            .map_err(Error::io("install IRQ routes"))?;
    }
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let bus_err = |e: devices::bus::BusError| Error::Device {
        name: "bus".into(),
        reason: e.to_string(),
    };

    let mut serial_log = None;
    let out: Box<dyn Write + Send> = match &cfg.serial {
        SerialConfig::Stdout => Box::new(std::io::stdout()),
        // Capped and rotated (`serial.log.1`): a guest printing in a loop cannot fill the disk.
        // Written by its own thread: the vCPU emulating the UART does no file work.
        SerialConfig::File(p) => {
            let w = crate::serial_log::LogWriter::new(Box::new(
                crate::serial_log::RotatingLog::open(p, crate::serial_log::SERIAL_LOG_CAP)
                    .map_err(|source| Error::File {
                        path: p.display().to_string(),
                        source,
                    })?,
            ));
            serial_log = Some(w.drain());
            Box::new(w)
        }
        SerialConfig::None => Box::new(std::io::sink()),
    };
    let root = Arc::new(Mutex::new(
        PciRoot::new(layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE)
            .with_mmio64(layout::PCI_MMIO64_START, layout::PCI_MMIO64_SIZE),
    ));
    let legacy = arch::add_legacy_devices(
        &arch::LegacyContext {
            vm,
            exit,
            pci: &root,
        },
        &mut pio,
        &mut mmio,
        |irq| {
            let mut serial = Serial::new(irq, out);
            if let Some(st) = serial_state {
                serial.restore_state(st)?;
            }
            Ok::<_, devices::legacy::SerialStateError>(serial)
        },
    )?;
    mmio.insert(
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
        Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
    )
    .map_err(bus_err)?;
    mmio.insert(
        layout::PCI_MMIO_START,
        layout::PCI_MMIO_SIZE,
        Arc::new(Mutex::new(PciMmioWindow::new(root.clone()))),
    )
    .map_err(bus_err)?;
    mmio.insert(
        layout::PCI_MMIO64_START,
        layout::PCI_MMIO64_SIZE,
        Arc::new(Mutex::new(PciMmioWindow::high(root.clone()))),
    )
    .map_err(bus_err)?;

    if cfg.firmware.is_some() {
        #[cfg(target_arch = "x86_64")]
        crate::firmware::add_devices(
            cfg.memory_mib << 20,
            cfg.vcpus,
            &mut pio,
            &mut mmio,
            &legacy,
            &root,
        )?;
    }

    let vm_hooks: Arc<dyn VmHooks> = hooks.clone();
    let virtio = DeviceManager::build(cfg, mem, &vm_hooks, &root)?;
    Ok(Devices {
        pio,
        mmio,
        serial: legacy.serial.clone(),
        serial_log,
        legacy,
        root,
        virtio,
        hooks,
    })
}

/// Blocks until one of `fds` (`None` entries are skipped) is readable; returns its position.
fn wait_readable(fds: &[Option<i32>]) -> std::io::Result<usize> {
    let mut polled: Vec<(usize, libc::pollfd)> = fds
        .iter()
        .enumerate()
        .filter_map(|(i, fd)| {
            fd.map(|fd| {
                (
                    i,
                    libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                )
            })
        })
        .collect();
    let mut raw: Vec<libc::pollfd> = polled.iter().map(|p| p.1).collect();
    loop {
        // SAFETY: `raw` is a valid array of `raw.len()` pollfd structs for the whole call.
        let r = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, -1) };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        for (p, fd) in polled.iter_mut().zip(&raw) {
            p.1.revents = fd.revents;
        }
        if let Some((i, _)) = polled.iter().find(|p| p.1.revents != 0) {
            return Ok(*i);
        }
    }
}
