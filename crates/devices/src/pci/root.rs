//! Bus 0: the host bridge at 00:00.0, devices at 00:01.0..00:1f.0, the BAR allocator, and the
//! bus adapters the VMM puts on its buses (CF8/CFC ports, ECAM, the MMIO window).

use std::sync::{Arc, Mutex};

use super::config::{PciConfig, PciConfigParams, BAR0_REG, NUM_BARS};
use super::{PciBar, PciDevice, PciError};
use crate::bus::{lock, BusDevice};
use crate::narrow::{low_u32, low_u8};

/// A PCI function shared between the root and the VMM.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Device slots on bus 0.
pub const NUM_SLOTS: usize = 32;
/// Host bridge vendor ID (Intel).
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// Host bridge device ID.
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
/// Host bridge subsystem vendor (Red Hat) and id ("QEMU virtual machine") of a firmware-booted
/// VM: SeaBIOS only reads QEMU's firmware configuration device on a machine whose host bridge
/// says this. Kernel boots keep 0:0.
pub const FIRMWARE_HOST_BRIDGE_SUBSYSTEM: (u16, u16) = (0x1af4, 0x1100);
/// Host bridge device ID of a firmware-booted VM: the i440FX's (82441FX), the platform OVMF
/// and SeaBIOS know as QEMU's `pc`. (OVMF takes [`HOST_BRIDGE_DEVICE`] for Cloud Hypervisor,
/// whose firmware is entered through PVH with a memory map, not at the reset vector.)
pub const FIRMWARE_HOST_BRIDGE_DEVICE: u16 = 0x1237;

const COMMAND_REG: usize = 1;

/// The host bridge at 00:00.0: identity only, no BARs.
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    /// A host bridge (class 0x060000).
    pub fn new() -> Self {
        Self::with_ids(HOST_BRIDGE_DEVICE, (0, 0))
    }

    /// The host bridge of a firmware-booted VM ([`FIRMWARE_HOST_BRIDGE_DEVICE`],
    /// [`FIRMWARE_HOST_BRIDGE_SUBSYSTEM`]).
    pub fn for_firmware() -> Self {
        Self::with_ids(FIRMWARE_HOST_BRIDGE_DEVICE, FIRMWARE_HOST_BRIDGE_SUBSYSTEM)
    }

    fn with_ids(device_id: u16, (subsystem_vendor_id, subsystem_id): (u16, u16)) -> Self {
        HostBridge {
            config: PciConfig::new(PciConfigParams {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id,
                revision: 0,
                class_code: 0x06_00_00,
                subsystem_vendor_id,
                subsystem_id,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
}

struct Slot {
    dev: SharedPciDevice,
    /// The BARs as currently decoded (empty while memory space is disabled).
    mapped: Vec<PciBar>,
}

/// A range of guest physical addresses BARs are allocated from.
#[derive(Debug, Clone, Copy)]
struct Window {
    base: u64,
    size: u64,
    /// Next free address.
    next: u64,
}

impl Window {
    fn new(base: u64, size: u64) -> Self {
        Window {
            base,
            size,
            next: base,
        }
    }

    fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    fn contains(&self, addr: u64, size: u64) -> bool {
        addr >= self.base && addr.checked_add(size).is_some_and(|e| e <= self.end())
    }
}

/// Bus 0 with its devices and the allocators of the 32-bit MMIO window (below 4 GiB) and the
/// 64-bit one (above RAM) that takes 64-bit prefetchable BARs.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    mmio32: Window,
    mmio64: Window,
    /// Where firmware may place BARs itself below 4 GiB (empty unless a firmware boots).
    firmware: Window,
    /// Where firmware may place 64-bit BARs itself (empty unless a firmware boots).
    firmware_high: Window,
    /// Functions other than 0 (device, function): config space only, no BARs. Hidden from
    /// enumeration unless function 0 of their device says it is multi-function; firmware
    /// reaches them by address.
    functions: Vec<((u8, u8), SharedPciDevice)>,
}

impl PciRoot {
    /// A bus with only the host bridge; BARs are allocated in `[mmio_base, mmio_base + mmio_size)`
    /// until a 64-bit window is added with [`with_mmio64`](Self::with_mmio64).
    pub fn new(mmio_base: u64, mmio_size: u64) -> Self {
        let mut slots: Vec<Option<Slot>> = (0..NUM_SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            dev: Arc::new(Mutex::new(HostBridge::new())),
            mapped: Vec::new(),
        });
        PciRoot {
            slots,
            mmio32: Window::new(mmio_base, mmio_size),
            mmio64: Window::new(0, 0),
            firmware: Window::new(0, 0),
            firmware_high: Window::new(0, 0),
            functions: Vec::new(),
        }
    }

    /// Adds the 64-bit window `[base, base + size)`: 64-bit prefetchable BARs are allocated
    /// there from now on.
    pub fn with_mmio64(mut self, base: u64, size: u64) -> Self {
        self.mmio64 = Window::new(base, size);
        self
    }

    /// Readies the bus for a firmware boot: the host bridge says what SeaBIOS and OVMF look for
    /// ([`HostBridge::for_firmware`]), and BARs the guest places in `[base, base + size)` (below
    /// 4 GiB) or `[high_base, high_base + high_size)` (above RAM) are decoded too, since
    /// firmware assigns BARs itself: SeaBIOS top-down from the IOAPIC, OVMF 64-bit ones in an
    /// aperture near the top of the physical address space. The VMM's allocator uses neither
    /// window. Kernel boots never call this.
    pub fn prepare_for_firmware(
        &mut self,
        (base, size): (u64, u64),
        (high_base, high_size): (u64, u64),
    ) {
        self.slots[0] = Some(Slot {
            dev: Arc::new(Mutex::new(HostBridge::for_firmware())),
            mapped: Vec::new(),
        });
        self.firmware = Window::new(base, size);
        self.firmware_high = Window::new(high_base, high_size);
    }

    /// Puts `device` at function `func` (1..=7) of slot `dev` (config space only: no BARs
    /// are decoded for it), replacing what was there.
    pub fn add_function(&mut self, dev: u8, func: u8, device: SharedPciDevice) {
        if func == 0 || func > 7 || usize::from(dev) >= NUM_SLOTS {
            return;
        }
        self.functions.retain(|(at, _)| *at != (dev, func));
        self.functions.push(((dev, func), device));
    }

    /// The function `func` (not 0) of slot `dev` on bus 0.
    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || func == 0 {
            return None;
        }
        self.functions
            .iter()
            .find_map(|(at, d)| (*at == (dev, func)).then_some(d))
    }

    /// Start of the 32-bit MMIO window.
    pub fn mmio_base(&self) -> u64 {
        self.mmio32.base
    }

    /// Size of the 32-bit MMIO window.
    pub fn mmio_size(&self) -> u64 {
        self.mmio32.size
    }

    /// Start of the 64-bit MMIO window.
    pub fn mmio64_base(&self) -> u64 {
        self.mmio64.base
    }

    /// Size of the 64-bit MMIO window (0 if there is none).
    pub fn mmio64_size(&self) -> u64 {
        self.mmio64.size
    }

    /// Adds a device at the next free slot; allocates its BARs; returns the device number.
    pub fn add_device(&mut self, dev: SharedPciDevice) -> Result<u8, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoFreeSlot)?;
        let slot_number = u8::try_from(slot).map_err(|_| PciError::NoFreeSlot)?;
        lock(&dev).set_requester_id(u16::from(slot_number) << 3);
        let mut bars = lock(&dev).bars();
        // Largest first keeps natural alignment from wasting space.
        bars.sort_by_key(|b| std::cmp::Reverse(b.size));
        let (mut low, mut high) = (self.mmio32, self.mmio64);
        let mut placed = Vec::with_capacity(bars.len());
        for bar in &bars {
            if !bar.size.is_power_of_two() || bar.index >= NUM_BARS {
                return Err(PciError::BadBar {
                    index: bar.index,
                    size: bar.size,
                });
            }
            let window = if bar.prefetchable && high.size > 0 {
                &mut high
            } else {
                &mut low
            };
            let addr = window
                .next
                .checked_add(bar.size - 1)
                .map(|a| a & !(bar.size - 1))
                .filter(|&a| window.contains(a, bar.size))
                .ok_or(PciError::MmioExhausted { size: bar.size })?;
            placed.push((bar.index, addr));
            window.next = addr + bar.size;
        }
        {
            let mut d = lock(&dev);
            for (index, addr) in placed {
                d.set_bar_addr(index, addr);
            }
        }
        (self.mmio32, self.mmio64) = (low, high);
        let mut s = Slot {
            dev,
            mapped: Vec::new(),
        };
        Self::refresh_mapping(&mut s, self.windows());
        self.slots[slot] = Some(s);
        Ok(slot_number)
    }

    /// Recomputes the decoded BARs of every device from its config space (after a restore
    /// wrote BAR and command registers directly), moving ioeventfds as needed.
    pub fn refresh_all(&mut self) {
        let windows = self.windows();
        for slot in self.slots.iter_mut().flatten() {
            Self::refresh_mapping(slot, windows);
        }
    }

    /// The device at bus 0, `dev`, function 0.
    fn slot(&self, bus: u8, dev: u8, func: u8) -> Option<&Slot> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(usize::from(dev))?.as_ref()
    }

    /// Reads config dword `reg` of (bus, dev, func); absent functions read all-ones.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, reg: usize) -> u32 {
        if let Some(function) = self.function(bus, dev, func) {
            return lock(function).config_read(reg);
        }
        match self.slot(bus, dev, func) {
            Some(s) => lock(&s.dev).config_read(reg),
            None => 0xffff_ffff,
        }
    }

    /// Writes `data` at byte `offset` of config dword `reg` of (bus, dev, func); writes to absent
    /// functions are dropped. Updates the MMIO decoding when a BAR or the command register changes.
    pub fn config_write(
        &mut self,
        bus: u8,
        dev: u8,
        func: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        if let Some(function) = self.function(bus, dev, func) {
            lock(function).config_write(reg, offset, data);
            return;
        }
        if bus != 0 || func != 0 {
            return;
        }
        let windows = self.windows();
        let Some(Some(slot)) = self.slots.get_mut(usize::from(dev)) else {
            return;
        };
        lock(&slot.dev).config_write(reg, offset, data);
        if reg == COMMAND_REG || (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            Self::refresh_mapping(slot, windows);
        }
    }

    /// The MMIO windows.
    fn windows(&self) -> [Window; 4] {
        [self.mmio32, self.mmio64, self.firmware, self.firmware_high]
    }

    /// Recomputes which BARs the slot decodes and tells the device about any move. A BAR is
    /// decoded while memory space is enabled and it lies wholly inside one MMIO window (the only
    /// places the VMM forwards accesses from), so a BAR the guest points at RAM or another
    /// device's registers gets no ioeventfds or memory mapping there.
    fn refresh_mapping(slot: &mut Slot, windows: [Window; 4]) {
        let mut dev = lock(&slot.dev);
        let memory_on =
            dev.config_read(COMMAND_REG) & u32::from(super::config::COMMAND_MEMORY) != 0;
        let new: Vec<PciBar> = if memory_on {
            dev.bars()
                .into_iter()
                .filter(|b| b.size > 0 && windows.iter().any(|w| w.contains(b.addr, b.size)))
                .collect()
        } else {
            Vec::new()
        };
        let find = |v: &[PciBar], i: usize| v.iter().find(|b| b.index == i).map(|b| b.addr);
        for index in 0..NUM_BARS {
            let (old_addr, new_addr) = (find(&slot.mapped, index), find(&new, index));
            if old_addr != new_addr {
                dev.bar_remapped(index, old_addr, new_addr);
            }
        }
        slot.mapped = new;
    }

    /// The device BAR decoding `[addr, addr + len)`: (device, BAR index, offset in the BAR).
    pub fn find_bar(&self, addr: u64, len: usize) -> Option<(SharedPciDevice, usize, u64)> {
        let end = addr.checked_add(len as u64)?;
        self.slots.iter().flatten().find_map(|s| {
            s.mapped.iter().find_map(|b| {
                let bar_end = b.addr.checked_add(b.size)?;
                (addr >= b.addr && end <= bar_end).then(|| (s.dev.clone(), b.index, addr - b.addr))
            })
        })
    }
}

/// Splits a config access at byte `start` into pieces that stay within one dword:
/// calls `f(reg, offset_in_dword, range_in_data)`.
fn for_each_dword(start: u64, len: usize, mut f: impl FnMut(usize, u64, std::ops::Range<usize>)) {
    let mut done = 0usize;
    while done < len {
        let at = start + done as u64;
        let off = at % 4;
        let n = (4 - off as usize).min(len - done);
        f((at / 4) as usize, off, done..done + n);
        done += n;
    }
}

fn root_config_read(root: &PciRoot, bdf: (u8, u8, u8), start: u64, data: &mut [u8]) {
    let len = data.len();
    for_each_dword(start, len, |reg, off, range| {
        let v = root.config_read(bdf.0, bdf.1, bdf.2, reg).to_le_bytes();
        // off < 4 and off + range.len() <= 4 (for_each_dword keeps pieces in one dword).
        let off = usize::from(crate::narrow::low_u8(off));
        data[range.clone()].copy_from_slice(&v[off..off + range.len()]);
    });
}

fn root_config_write(root: &mut PciRoot, bdf: (u8, u8, u8), start: u64, data: &[u8]) {
    for_each_dword(start, data.len(), |reg, off, range| {
        root.config_write(bdf.0, bdf.1, bdf.2, reg, off, &data[range]);
    });
}

/// Config mechanism #1: ports 0xCF8 (CONFIG_ADDRESS, dword) and 0xCFC..0xCFF (CONFIG_DATA).
/// Insert on the port bus at 0xCF8 with length 8.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    /// Adapter over `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// (bus, dev, func) and the byte offset of the register CONFIG_ADDRESS selects, if enabled.
    fn target(&self) -> Option<((u8, u8, u8), u64)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let a64 = u64::from(a);
        let bdf = (
            low_u8(a64 >> 16),
            low_u8((a64 >> 11) & 0x1f),
            low_u8((a64 >> 8) & 7),
        );
        Some((bdf, u64::from(a & 0xfc)))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        match offset {
            0 if len == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if offset - 4 + len <= 4 => match self.target() {
                Some((bdf, reg)) => {
                    root_config_read(&lock(&self.root), bdf, reg + offset - 4, data)
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        match offset {
            0 if len == 4 => {
                self.address = low_u32(super::le_bytes_to_u64(data)) & 0x80ff_fffc;
            }
            4..=7 if offset - 4 + len <= 4 => {
                if let Some((bdf, reg)) = self.target() {
                    root_config_write(&mut lock(&self.root), bdf, reg + offset - 4, data);
                }
            }
            _ => {}
        }
    }
}

/// PCI Express enhanced configuration (ECAM): offset = bus << 20 | dev << 15 | fn << 12 | reg.
/// Insert on the MMIO bus at the ECAM base.
pub struct PciConfigMmio(pub Arc<Mutex<PciRoot>>);

impl PciConfigMmio {
    /// Adapter over `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio(root)
    }

    fn decode(offset: u64) -> ((u8, u8, u8), u64) {
        let bdf = (
            ((offset >> 20) & 0xff) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
        );
        (bdf, offset & 0xfff)
    }

    /// Whether an access stays within one function's 4 KiB.
    fn in_function(offset: u64, len: usize) -> bool {
        (offset & 0xfff) + len as u64 <= 0x1000
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !Self::in_function(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        let (bdf, reg) = Self::decode(offset);
        root_config_read(&lock(&self.0), bdf, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !Self::in_function(offset, data.len()) {
            return;
        }
        let (bdf, reg) = Self::decode(offset);
        root_config_write(&mut lock(&self.0), bdf, reg, data);
    }
}

/// A PCI MMIO window: forwards each access to the device BAR that decodes it right now, so a
/// BAR the guest moves is found at its new address. Insert on the MMIO bus over the window it
/// was made for ([`new`](Self::new): the 32-bit one given to [`PciRoot::new`];
/// [`high`](Self::high): the one given to [`PciRoot::with_mmio64`]). Unclaimed reads return
/// all-ones.
pub struct PciMmioWindow {
    root: Arc<Mutex<PciRoot>>,
    base: u64,
}

impl PciMmioWindow {
    /// Adapter over the 32-bit window of `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        let base = lock(&root).mmio_base();
        PciMmioWindow { root, base }
    }

    /// Adapter for BARs firmware places anywhere from `base` up (SeaBIOS and OVMF assign BARs
    /// themselves); insert it on the MMIO bus at `base`, over a window given to
    /// [`PciRoot::prepare_for_firmware`].
    pub fn at(root: Arc<Mutex<PciRoot>>, base: u64) -> Self {
        PciMmioWindow { root, base }
    }

    /// Adapter over the 64-bit window of `root`.
    pub fn high(root: Arc<Mutex<PciRoot>>) -> Self {
        let base = lock(&root).mmio64_base();
        PciMmioWindow { root, base }
    }

    /// The device to forward to; the root lock is released before the device is locked.
    fn target(&self, offset: u64, len: usize) -> Option<(SharedPciDevice, usize, u64)> {
        let addr = self.base.checked_add(offset)?;
        lock(&self.root).find_bar(addr, len)
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset, data.len()) {
            Some((dev, bar, off)) => lock(&dev).bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((dev, bar, off)) = self.target(offset, data.len()) {
            lock(&dev).bar_write(bar, off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::BarKind;

    /// A device with one 64-bit BAR that records accesses and remaps.
    struct Dummy {
        config: PciConfig,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Dummy {
        fn new(size: u64) -> (Arc<Mutex<Dummy>>, Arc<Mutex<Vec<String>>>) {
            Dummy::with_kind(size, BarKind::Mem64)
        }

        fn with_kind(size: u64, kind: BarKind) -> (Arc<Mutex<Dummy>>, Arc<Mutex<Vec<String>>>) {
            let mut config = PciConfig::new(PciConfigParams {
                vendor_id: 0x1234,
                device_id: 0x5678,
                class_code: 0xff0000,
                ..Default::default()
            });
            config.add_bar(0, size, kind).unwrap();
            let log = Arc::new(Mutex::new(Vec::new()));
            (
                Arc::new(Mutex::new(Dummy {
                    config,
                    log: log.clone(),
                })),
                log,
            )
        }
    }

    impl PciDevice for Dummy {
        fn config_read(&mut self, reg: usize) -> u32 {
            self.config.read(reg)
        }
        fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.config.write(reg, offset, data)
        }
        fn bars(&self) -> Vec<PciBar> {
            self.config.bars()
        }
        fn set_bar_addr(&mut self, index: usize, addr: u64) {
            self.config.set_bar_addr(index, addr)
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            // A recognisable byte: BAR in the high nibble, offset in the low one.
            data.fill(low_u8((bar as u64) << 4 | (offset & 0xf)));
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            lock(&self.log).push(format!("w{bar}:{offset:#x}:{data:?}"));
        }
        fn bar_remapped(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
            lock(&self.log).push(format!("m{bar}:{old:x?}->{new:x?}"));
        }
    }

    const BASE: u64 = 0xc000_0000;

    fn io_read(io: &mut PciConfigIo, dev: u8, reg: u8, offset: u64, len: usize) -> u32 {
        let addr = 0x8000_0000u32 | u32::from(dev) << 11 | u32::from(reg);
        io.write(0, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4 + offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn io_write(io: &mut PciConfigIo, dev: u8, reg: u8, value: u32) {
        let addr = 0x8000_0000u32 | u32::from(dev) << 11 | u32::from(reg);
        io.write(0, &addr.to_le_bytes());
        io.write(4, &value.to_le_bytes());
    }

    #[test]
    fn host_bridge_and_absent_slots() {
        let root = Arc::new(Mutex::new(PciRoot::new(BASE, 0x1000_0000)));
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(io_read(&mut io, 0, 0, 0, 4), 0x0d57_8086);
        assert_eq!(io_read(&mut io, 0, 8, 0, 4) >> 8, 0x06_00_00);
        assert_eq!(io_read(&mut io, 0, 0, 2, 2), 0x0d57);
        assert_eq!(io_read(&mut io, 0, 0, 1, 1), 0x80);
        assert_eq!(io_read(&mut io, 5, 0, 0, 4), 0xffff_ffff);
        // Vendor ID is read-only.
        io_write(&mut io, 0, 0, 0);
        assert_eq!(io_read(&mut io, 0, 0, 0, 4), 0x0d57_8086);
        // Function 1 and bus 1 are absent.
        let mut ecam = PciConfigMmio::new(root.clone());
        let mut b = [0u8; 4];
        ecam.read(1 << 12, &mut b);
        assert_eq!(b, [0xff; 4]);
        ecam.read(1 << 20, &mut b);
        assert_eq!(b, [0xff; 4]);
        ecam.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0d57_8086);
        // An 8-byte ECAM read is split in dwords.
        let mut q = [0u8; 8];
        ecam.read(0, &mut q);
        assert_eq!(u32::from_le_bytes(q[..4].try_into().unwrap()), 0x0d57_8086);
        // Disabled CONFIG_ADDRESS reads all-ones; CONFIG_ADDRESS reads back.
        io.write(0, &0x0000_0000u32.to_le_bytes());
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        io.write(0, &0x8000_0803u32.to_le_bytes());
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0800);
    }

    #[test]
    fn bar_allocation_sizing_and_relocation() {
        let root = Arc::new(Mutex::new(PciRoot::new(BASE, 0x10_0000)));
        let (d1, _) = Dummy::new(0x4000);
        let (d2, log2) = Dummy::new(0x1000);
        assert_eq!(lock(&root).add_device(d1).unwrap(), 1);
        assert_eq!(lock(&root).add_device(d2).unwrap(), 2);
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(io_read(&mut io, 1, 0x10, 0, 4), 0xc000_0004);
        assert_eq!(io_read(&mut io, 2, 0x10, 0, 4), 0xc000_4004);
        // Sizing.
        io_write(&mut io, 2, 0x10, 0xffff_ffff);
        io_write(&mut io, 2, 0x14, 0xffff_ffff);
        assert_eq!(io_read(&mut io, 2, 0x10, 0, 4), 0xffff_f004);
        assert_eq!(io_read(&mut io, 2, 0x14, 0, 4), 0xffff_ffff);
        io_write(&mut io, 2, 0x10, 0xc000_4000);
        io_write(&mut io, 2, 0x14, 0);
        // Memory decoding off: the window does not reach the device.
        let mut win = PciMmioWindow::new(root.clone());
        let mut b = [0u8; 1];
        win.read(0x4003, &mut b);
        assert_eq!(b, [0xff]);
        assert!(lock(&log2).is_empty());
        // Enable memory: mapped, device told.
        io_write(&mut io, 2, 0x04, 0x2);
        assert_eq!(
            lock(&log2).as_slice(),
            ["m0:None->Some(c0004000)".to_string()]
        );
        win.read(0x4003, &mut b);
        assert_eq!(b, [0x03]);
        // Relocate: old address unclaimed, new address reaches the device.
        io_write(&mut io, 2, 0x10, 0xc008_0000);
        assert_eq!(
            lock(&log2).last().unwrap(),
            "m0:Some(c0004000)->Some(c0080000)"
        );
        win.read(0x4003, &mut b);
        assert_eq!(b, [0xff]);
        win.read(0x8_0005, &mut b);
        assert_eq!(b, [0x05]);
        win.write(0x8_0010, &[9]);
        assert_eq!(lock(&log2).last().unwrap(), "w0:0x10:[9]");
        // Access straddling the BAR end is not dispatched.
        let mut w = [0u8; 4];
        win.read(0x8_0ffe, &mut w);
        assert_eq!(w, [0xff; 4]);
        // Moved outside the window (here: onto RAM): no longer decoded.
        io_write(&mut io, 2, 0x10, 0x0000_1000);
        assert_eq!(lock(&log2).last().unwrap(), "m0:Some(c0080000)->None");
        io_write(&mut io, 2, 0x10, 0xc008_0000);
        assert_eq!(lock(&log2).last().unwrap(), "m0:None->Some(c0080000)");
        // Disable memory: unmapped.
        io_write(&mut io, 2, 0x04, 0);
        assert_eq!(lock(&log2).last().unwrap(), "m0:Some(c0080000)->None");
    }

    #[test]
    fn bars_firmware_places_decode_only_inside_the_firmware_window() {
        let root = Arc::new(Mutex::new(PciRoot::new(BASE, 0x10_0000)));
        let (dev, log) = Dummy::with_kind(0x1000, BarKind::Mem32);
        assert_eq!(lock(&root).add_device(dev).unwrap(), 1);
        let mut io = PciConfigIo::new(root.clone());
        // A kernel boot's host bridge has no subsystem id; a firmware boot's says QEMU.
        assert_eq!(io_read(&mut io, 0, 0x2c, 0, 4), 0);
        io_write(&mut io, 1, 0x04, 0x2);
        lock(&log).clear();
        // SeaBIOS's choice, below the IOAPIC: not decoded without the firmware window...
        io_write(&mut io, 1, 0x10, 0xfebf_0000);
        assert!(lock(&root).find_bar(0xfebf_0010, 4).is_none());
        // ...decoded with it, and the device told.
        lock(&root).prepare_for_firmware(
            (0xe010_0000, 0xfec0_0000 - 0xe010_0000),
            (0x1_0000_0000, 0xff_0000_0000),
        );
        // The i440FX host bridge, with QEMU's subsystem id.
        assert_eq!(io_read(&mut io, 0, 0x00, 0, 4), 0x1237_8086);
        assert_eq!(io_read(&mut io, 0, 0x2c, 0, 4), 0x1100_1af4);
        io_write(&mut io, 1, 0x10, 0xfebf_0000);
        assert!(lock(&root).find_bar(0xfebf_0010, 4).is_some());
        assert!(lock(&log).iter().any(|l| l.ends_with("->Some(febf0000)")));
        // Still nothing outside the windows (RAM, say).
        io_write(&mut io, 1, 0x10, 0x1000_0000);
        assert!(lock(&root).find_bar(0x1000_0010, 4).is_none());
    }

    #[test]
    fn firmware_places_64_bit_bars_in_the_high_firmware_window() {
        let root = Arc::new(Mutex::new(PciRoot::new(BASE, 0x10_0000)));
        let (dev, _) = Dummy::with_kind(0x4000, BarKind::Mem64Prefetchable);
        lock(&root).add_device(dev).unwrap();
        lock(&root)
            .prepare_for_firmware((0xe010_0000, 0x1000_0000), (0x1_0000_0000, 0xff_0000_0000));
        let mut io = PciConfigIo::new(root.clone());
        io_write(&mut io, 1, 0x04, 0x2);
        // OVMF's aperture near the top of a 40-bit address space.
        io_write(&mut io, 1, 0x10, 0x0000_000c);
        io_write(&mut io, 1, 0x14, 0xe0);
        assert!(lock(&root).find_bar(0xe0_0000_0010, 4).is_some());
        // Past the window's end (the VMM's own 64-bit window is there): not decoded.
        io_write(&mut io, 1, 0x14, 0x100);
        assert!(lock(&root).find_bar(0x100_0000_0010, 4).is_none());
    }

    #[test]
    fn a_function_other_than_0_answers_its_config_space_only() {
        let mut root = PciRoot::new(BASE, 0x10_0000);
        assert_eq!(root.config_read(0, 1, 3, 0), 0xffff_ffff);
        root.add_function(
            1,
            3,
            Arc::new(Mutex::new(super::super::piix_pm::PiixPm::new(0x600))),
        );
        assert_eq!(root.config_read(0, 1, 3, 0), 0x7113_8086);
        assert_eq!(root.config_read(0, 1, 3, 0x40 / 4), 0x601);
        // Writes reach it; the fixed PM base stays.
        root.config_write(0, 1, 3, 0x40 / 4, 0, &0xb000u32.to_le_bytes());
        assert_eq!(root.config_read(0, 1, 3, 0x40 / 4), 0x601);
        // Function 0 of the slot is still absent, and so is function 2 and bus 1's 1.3.
        assert_eq!(root.config_read(0, 1, 0, 0), 0xffff_ffff);
        assert_eq!(root.config_read(0, 1, 2, 0), 0xffff_ffff);
        assert_eq!(root.config_read(1, 1, 3, 0), 0xffff_ffff);
    }

    #[test]
    fn prefetchable_bars_go_to_the_64_bit_window() {
        const HIGH: u64 = 0x100_0000_0000;
        let root = Arc::new(Mutex::new(
            PciRoot::new(BASE, 0x10_0000).with_mmio64(HIGH, 0x1_0000_0000),
        ));
        let (regs, _) = Dummy::new(0x4000);
        let (shm, log) = Dummy::with_kind(0x4000_0000, BarKind::Mem64Prefetchable);
        lock(&root).add_device(regs).unwrap();
        lock(&root).add_device(shm).unwrap();
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(io_read(&mut io, 1, 0x10, 0, 4), 0xc000_0004);
        // Prefetchable, 64-bit: flags 0b1100, placed at the start of the high window.
        assert_eq!(io_read(&mut io, 2, 0x10, 0, 4), 0x0000_000c);
        assert_eq!(io_read(&mut io, 2, 0x14, 0, 4), 0x100);
        // A 1 GiB BAR would not have fit in the 1 MiB low window.
        io_write(&mut io, 2, 0x04, 0x2);
        assert_eq!(lock(&log).last().unwrap(), "m0:None->Some(10000000000)");
        let mut high = PciMmioWindow::high(root.clone());
        let mut b = [0u8; 1];
        high.read(0x3fff_ff07, &mut b);
        assert_eq!(b, [0x07]);
        high.write(0x10, &[1]);
        assert_eq!(lock(&log).last().unwrap(), "w0:0x10:[1]");
        // Past the BAR: unclaimed.
        high.read(0x4000_0000, &mut b);
        assert_eq!(b, [0xff]);
        // Moved above the high window: no longer decoded.
        io_write(&mut io, 2, 0x14, 0x200);
        assert_eq!(lock(&log).last().unwrap(), "m0:Some(10000000000)->None");

        // Without a 64-bit window, prefetchable BARs share the 32-bit one.
        let mut low_only = PciRoot::new(BASE, 0x10_0000);
        let (d, _) = Dummy::with_kind(0x1000, BarKind::Mem64Prefetchable);
        low_only.add_device(d.clone()).unwrap();
        assert_eq!(lock(&d).config.bar_addr(0), Some(BASE));
        let (big, _) = Dummy::with_kind(0x4000_0000, BarKind::Mem64Prefetchable);
        assert!(matches!(
            low_only.add_device(big),
            Err(PciError::MmioExhausted { .. })
        ));
    }

    #[test]
    fn allocation_failures() {
        let mut root = PciRoot::new(BASE, 0x8000);
        let (d1, _) = Dummy::new(0x4000);
        let (d2, _) = Dummy::new(0x8000);
        root.add_device(d1).unwrap();
        assert!(matches!(
            root.add_device(d2),
            Err(PciError::MmioExhausted { .. })
        ));
        let mut root = PciRoot::new(BASE, 0x1_0000_0000);
        for i in 1..32 {
            let (d, _) = Dummy::new(0x10);
            assert_eq!(root.add_device(d).unwrap(), i);
        }
        let (d, _) = Dummy::new(0x10);
        assert!(matches!(root.add_device(d), Err(PciError::NoFreeSlot)));
    }

    #[test]
    fn garbage_accesses_do_not_panic() {
        let root = Arc::new(Mutex::new(PciRoot::new(BASE, 0x10_0000)));
        let (d1, _) = Dummy::new(0x4000);
        lock(&root).add_device(d1).unwrap();
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciConfigMmio::new(root.clone());
        let mut win = PciMmioWindow::new(root.clone());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let r = next();
            let len = [1usize, 2, 4, 8, 3][(r % 5) as usize];
            let val = next().to_le_bytes();
            let mut buf = [0u8; 8];
            let off = next();
            match r >> 60 {
                0..=3 => {
                    io.write(off % 8, &val[..len.min(8 - (off % 8) as usize)]);
                    io.read(off % 8, &mut buf[..len.min(8 - (off % 8) as usize)]);
                }
                4..=9 => {
                    // Mostly device 1, sometimes anywhere.
                    let o = if r & 1 == 0 {
                        (1 << 15) | (off & 0xfff)
                    } else {
                        off % 0x10_0000
                    };
                    ecam.write(o, &val[..len]);
                    ecam.read(o, &mut buf[..len]);
                }
                _ => {
                    let o = off % 0x10_0000;
                    win.write(o, &val[..len]);
                    win.read(o, &mut buf[..len]);
                }
            }
        }
    }
}
