//! The x86_64 legacy platform devices on the port bus: the 16550 at COM1 with its irqfd, the
//! i8042 (reset; for firmware also the keyboard probe), the CMOS real-time clock (0x70-0x71), the ACPI PM1a block (power-off), the
//! debug-exit port, the POST-code sink at 0x80 and the PCI configuration ports 0xcf8-0xcff.

use std::sync::{Arc, Mutex, OnceLock};

use devices::bus::{Bus, SharedDevice};
use devices::legacy::{
    AcpiPm, Cmos, CmosState, DebugExit, ExitSignal, FwCfg, FwCfgState, PortSink, Serial, I8042,
};
use devices::pci::{PciConfigIo, PciRoot};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::layout::{COM1_IRQ, COM1_PORT, DEBUG_EXIT_PORT, PM1A_EVT_PORT};
use super::{kvm_err, Error};

/// The i8042 data and command ports (0x60-0x64).
pub const I8042_PORT: u16 = 0x60;
/// The CMOS RTC's index and data ports (0x70-0x71).
pub const CMOS_PORT: u16 = 0x70;
/// The POST-code port, written by firmware and Linux's `outb_p` delays.
pub const POST_CODE_PORT: u16 = 0x80;
/// The PCI configuration address and data ports (type 1 access).
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;

/// What the VMM keeps of the legacy devices.
pub struct LegacyDevices {
    /// The console UART (snapshots save it).
    pub serial: Arc<Mutex<Serial>>,
    /// The CMOS RTC (snapshots save it in [`PlatformState`]).
    rtc: Arc<Mutex<Cmos>>,
    /// The keyboard controller.
    i8042: Arc<Mutex<I8042>>,
    /// The firmware configuration device, in a firmware boot (snapshots save its position).
    fw_cfg: OnceLock<Arc<Mutex<FwCfg>>>,
}

/// The platform devices' state a snapshot carries besides the UART: the CMOS RTC (its RAM
/// and the offset the guest set from the host's time) and, in a firmware boot, the fw_cfg
/// device's selected item and read position.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlatformState {
    /// The CMOS RTC.
    pub rtc: CmosState,
    /// The fw_cfg device (firmware boots; absent in kernel boots and older snapshots, which
    /// restore it fresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fw_cfg: Option<FwCfgState>,
}

impl LegacyDevices {
    /// The state a snapshot keeps.
    pub fn save_platform(&self) -> PlatformState {
        PlatformState {
            rtc: devices::bus::lock(&self.rtc).save_state(),
            fw_cfg: self
                .fw_cfg
                .get()
                .map(|dev| devices::bus::lock(dev).save_state()),
        }
    }

    /// Keeps the firmware configuration device of a firmware boot, so that snapshots save
    /// its state; a second device is refused.
    pub fn attach_fw_cfg(&self, dev: Arc<Mutex<FwCfg>>) -> Result<(), Error> {
        self.fw_cfg
            .set(dev)
            .map_err(|_| Error::BadVmState("a second fw_cfg device".into()))
    }

    /// Describes the machine in CMOS RAM for firmware: RAM below and above the MMIO hole and
    /// the vCPU count (see [`Cmos::set_machine_info`]).
    pub fn set_machine_info(&self, mem_size: u64, nr_vcpus: u8) {
        let low = super::layout::low_ram_end(mem_size);
        devices::bus::lock(&self.rtc).set_machine_info(low, mem_size - low, nr_vcpus);
    }

    /// Makes the keyboard controller answer the probes firmware sends (self-test, keyboard
    /// reset; see [`I8042::answer_probes`]); firmware boots only.
    pub fn answer_keyboard_probes(&self) {
        devices::bus::lock(&self.i8042).answer_probes();
    }

    /// Puts the devices in `state` (a restore, before the vCPUs run); a bad state is refused
    /// and changes nothing.
    pub fn restore_platform(&self, state: &PlatformState) -> Result<(), Error> {
        let fw_cfg = match (&state.fw_cfg, self.fw_cfg.get()) {
            (Some(saved), Some(dev)) => Some((saved, dev)),
            (Some(_), None) => {
                return Err(Error::BadVmState(
                    "fw_cfg state in a VM that does not boot firmware".into(),
                ))
            }
            (None, _) => None,
        };
        devices::bus::lock(&self.rtc)
            .restore_state(&state.rtc)
            .map_err(|e| Error::BadVmState(e.to_string()))?;
        if let Some((saved, dev)) = fw_cfg {
            devices::bus::lock(dev).restore_state(saved);
        }
        Ok(())
    }
}

/// What the legacy devices are wired to.
pub struct LegacyContext<'a> {
    /// The VM (for the serial irqfd).
    pub vm: &'a VmFd,
    /// Where the power-off, reset and debug-exit devices report.
    pub exit: &'a Arc<ExitSignal>,
    /// The PCI root the configuration ports reach.
    pub pci: &'a Arc<Mutex<PciRoot>>,
}

/// Puts the legacy devices on the port bus (x86_64 has none on the MMIO bus).
/// `make_serial` builds the UART (new, or from a snapshot) around the interrupt eventfd it is
/// given, which is already wired to the UART's IRQ.
pub fn add_legacy_devices<E>(
    ctx: &LegacyContext<'_>,
    pio: &mut Bus,
    _mmio: &mut Bus,
    make_serial: impl FnOnce(EventFd) -> Result<Serial, E>,
) -> Result<LegacyDevices, Error>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Io {
        what: "create the serial interrupt eventfd",
        source,
    })?;
    ctx.vm
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let serial = make_serial(serial_irq).map_err(|e| Error::Serial(Box::new(e)))?;
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(u64::from(COM1_PORT), 8, serial.clone())?;

    let exit = ctx.exit;
    let rtc = Arc::new(Mutex::new(Cmos::new()));
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
    let ports: [(u16, u64, SharedDevice); 6] = [
        (I8042_PORT, 5, i8042.clone()),
        (
            PM1A_EVT_PORT,
            8,
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        ),
        (
            DEBUG_EXIT_PORT,
            4,
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        ),
        (CMOS_PORT, 2, rtc.clone()),
        (POST_CODE_PORT, 1, Arc::new(Mutex::new(PortSink))),
        (
            PCI_CONFIG_IO_PORT,
            8,
            Arc::new(Mutex::new(PciConfigIo::new(ctx.pci.clone()))),
        ),
    ];
    for (port, len, dev) in ports {
        pio.insert(u64::from(port), len, dev)?;
    }
    Ok(LegacyDevices {
        serial,
        rtc,
        i8042,
        fw_cfg: OnceLock::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::legacy::GuestExit;
    use kvm_ioctls::VcpuExit;

    /// A VM with the legacy devices on a port bus of its own (UART to nowhere).
    fn legacy_platform(kvm: &kvm_ioctls::Kvm) -> (LegacyDevices, Bus, VmFd) {
        let vm = super::super::create_vm(kvm).unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let root = Arc::new(Mutex::new(PciRoot::new(0xc000_0000, 0x1000_0000)));
        let mut pio = Bus::new();
        let ctx = LegacyContext {
            vm: &vm,
            exit: &exit,
            pci: &root,
        };
        let legacy = add_legacy_devices(&ctx, &mut pio, &mut Bus::new(), |irq| {
            Ok::<_, std::io::Error>(Serial::new(irq, Box::new(std::io::sink())))
        })
        .unwrap();
        (legacy, pio, vm)
    }

    #[test]
    fn the_ports_reach_their_devices_through_the_exit_hook() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let vm = super::super::create_vm(&kvm).unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let root = Arc::new(Mutex::new(PciRoot::new(
            super::super::layout::PCI_MMIO_START,
            super::super::layout::PCI_MMIO_SIZE,
        )));
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let ctx = LegacyContext {
            vm: &vm,
            exit: &exit,
            pci: &root,
        };
        let legacy = add_legacy_devices(&ctx, &mut pio, &mut mmio, |irq| {
            Ok::<_, std::io::Error>(Serial::new(irq, Box::new(std::io::sink())))
        })
        .unwrap();
        assert!(
            Arc::strong_count(&legacy.serial) >= 2,
            "the bus holds the UART"
        );

        let pio_read = |port: u16, data: &mut [u8]| {
            assert!(crate::handle_arch_exit(VcpuExit::IoIn(port, data), &pio, false).is_none());
        };
        // The UART's line status register: transmitter empty.
        let mut lsr = [0u8];
        pio_read(COM1_PORT + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Type 1 PCI config access: host bridge at 00:00.0 is there (vendor id not 0xffff).
        let addr = 0x8000_0000u32.to_le_bytes();
        assert!(crate::handle_arch_exit(VcpuExit::IoOut(0xcf8, &addr), &pio, false).is_none());
        let mut id = [0u8; 2];
        pio_read(0xcfc, &mut id);
        assert_ne!(u16::from_le_bytes(id), 0xffff);
        // A port nobody owns reads as all ones.
        let mut none = [0u8; 2];
        pio_read(0x2f8, &mut none);
        assert_eq!(none, [0xff, 0xff]);
        // MMIO is not this hook's business.
        let mut buf = [0u8; 4];
        assert!(
            crate::handle_arch_exit(VcpuExit::MmioRead(0x1000, &mut buf), &pio, false).is_some()
        );
        // The debug-exit port ends the VM with the value written.
        let v = 7u32.to_le_bytes();
        assert!(
            crate::handle_arch_exit(VcpuExit::IoOut(DEBUG_EXIT_PORT, &v), &pio, false).is_none()
        );
        assert_eq!(exit.reason(), Some(GuestExit::DebugExit(7)));
    }

    #[test]
    fn the_rtc_the_guest_set_survives_save_and_restore_into_new_devices() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let build = || legacy_platform(&kvm);
        let out = |pio: &Bus, port: u16, v: u8| {
            assert!(crate::handle_arch_exit(VcpuExit::IoOut(port, &[v]), pio, false).is_none());
        };
        let read = |pio: &Bus, index: u8| {
            out(pio, CMOS_PORT, index);
            let mut v = [0u8];
            assert!(
                crate::handle_arch_exit(VcpuExit::IoIn(CMOS_PORT + 1, &mut v), pio, false)
                    .is_none()
            );
            v[0]
        };
        let (a, pio_a, _vm_a) = build();
        // Binary mode, then the year 2001: the guest's clock is decades behind the host's.
        out(&pio_a, CMOS_PORT, 0x0b);
        out(&pio_a, CMOS_PORT + 1, 0x06);
        out(&pio_a, CMOS_PORT, 0x09);
        out(&pio_a, CMOS_PORT + 1, 1);
        let saved = a.save_platform();

        let (b, pio_b, _vm_b) = build();
        assert_ne!(read(&pio_b, 0x09), 1, "a new RTC already reads 2001");
        b.restore_platform(&saved).unwrap();
        assert_eq!(read(&pio_b, 0x0b), 0x06, "status B");
        assert_eq!(read(&pio_b, 0x09), 1, "the guest's year after the restore");

        let mut bad = saved.clone();
        bad.rtc.ram.truncate(3);
        assert!(matches!(
            b.restore_platform(&bad),
            Err(Error::BadVmState(_))
        ));
    }

    #[test]
    fn a_firmware_guest_reads_fw_cfg_on_after_save_and_restore() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        const FW_CFG_PORT: u16 = 0x510;
        let build = |firmware: bool| {
            let (legacy, mut pio, vm) = legacy_platform(&kvm);
            if firmware {
                let mut cfg = FwCfg::new(1);
                cfg.add_file("etc/boot-order", b"/pci@i0cf8/disk".to_vec())
                    .unwrap();
                let dev = Arc::new(Mutex::new(cfg));
                pio.insert(u64::from(FW_CFG_PORT), 2, dev.clone()).unwrap();
                legacy.attach_fw_cfg(dev.clone()).unwrap();
                assert!(legacy.attach_fw_cfg(dev).is_err(), "a second device");
            }
            (legacy, pio, vm)
        };
        let read = |pio: &Bus, n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    let mut v = [0u8];
                    assert!(crate::handle_arch_exit(
                        VcpuExit::IoIn(FW_CFG_PORT + 1, &mut v),
                        pio,
                        false
                    )
                    .is_none());
                    v[0]
                })
                .collect()
        };
        let (a, pio_a, _vm_a) = build(true);
        let select = 0x20u16.to_le_bytes();
        assert!(
            crate::handle_arch_exit(VcpuExit::IoOut(FW_CFG_PORT, &select), &pio_a, false).is_none()
        );
        assert_eq!(read(&pio_a, 5), b"/pci@");
        let saved = a.save_platform();

        let (b, pio_b, _vm_b) = build(true);
        b.restore_platform(&saved).unwrap();
        assert_eq!(read(&pio_b, 5), b"i0cf8", "read on from the saved position");

        // A kernel boot saves none, and refuses a fw_cfg state it has no device for.
        let (kernel, _pio, _vm) = build(false);
        assert!(kernel.save_platform().fw_cfg.is_none());
        assert!(matches!(
            kernel.restore_platform(&saved),
            Err(Error::BadVmState(_))
        ));
    }

    #[test]
    fn a_serial_that_cannot_be_built_is_a_typed_error() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let vm = super::super::create_vm(&kvm).unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let root = Arc::new(Mutex::new(PciRoot::new(0xc000_0000, 0x1000_0000)));
        let ctx = LegacyContext {
            vm: &vm,
            exit: &exit,
            pci: &root,
        };
        let err = add_legacy_devices(&ctx, &mut Bus::new(), &mut Bus::new(), |_| {
            Err(std::io::Error::other("bad saved UART"))
        })
        .err()
        .unwrap();
        assert!(matches!(err, Error::Serial(_)));
        assert_eq!(err.to_string(), "serial port: bad saved UART");
    }
}
