//! Dirty page tracking with real guests: KVM's log sees exactly the pages the guest wrote and
//! re-arms after each read; the guest memory bitmap sees what devices and the VMM wrote.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::{RunOutcome, SerialConfig, Vm, VmConfig};

use common::{probe, Running, Scratch};

const PAGE_A: u64 = 0x20_0000;
const PAGE_B: u64 = 0x34_5000;
const PAGE_C: u64 = 0x5f_f000;
const FLAG: u64 = 0x30_0000;
const EXIT: u32 = 0x31;

/// `mov dword [addr], value` (32-bit protected mode).
fn store(code: &mut Vec<u8>, addr: u64, value: u32) {
    code.extend_from_slice(&[0xc7, 0x05]);
    code.extend_from_slice(&u32::try_from(addr).unwrap().to_le_bytes());
    code.extend_from_slice(&value.to_le_bytes());
}

/// Writes pages A and B, spins until the host sets FLAG, writes page C, exits with EXIT.
fn guest_code() -> Vec<u8> {
    let mut c = Vec::new();
    store(&mut c, PAGE_A, 0xa1a1_a1a1);
    store(&mut c, PAGE_B + 0x10, 0xb2b2_b2b2);
    // spin: cmp dword [FLAG], 0; je spin
    c.extend_from_slice(&[0x83, 0x3d]);
    c.extend_from_slice(&u32::try_from(FLAG).unwrap().to_le_bytes());
    c.extend_from_slice(&[0x00, 0x74, 0xf7]);
    store(&mut c, PAGE_C, 0xc3c3_c3c3);
    c.extend_from_slice(&e2e::elf::debug_exit_code(EXIT));
    c
}

fn pages(regions: &[vmm::DirtyRegion]) -> BTreeSet<u64> {
    regions.iter().flat_map(|r| r.pages()).collect()
}

#[test]
fn kvm_log_has_exactly_the_guest_writes_and_rearms() {
    if !e2e::require_kvm("kvm_log_has_exactly_the_guest_writes_and_rearms") {
        return;
    }
    let s = Scratch::new("dirty-kvm");
    let kernel = s.path("k.elf");
    std::fs::write(&kernel, e2e::elf::pvh_kernel(&guest_code())).unwrap();
    let mut cfg = VmConfig::new(kernel);
    cfg.memory_mib = 32;
    cfg.serial = SerialConfig::None;
    let vm = Vm::new(&cfg).unwrap();
    let mem = vm.guest_memory();
    let dirty = vm.dirty_log();
    // Loading the kernel wrote guest memory (the bitmap saw it); start() forgets that.
    assert!(!pages(&vm.dirty_pages().unwrap()).is_empty());
    dirty.start().unwrap();
    assert!(dirty.is_logging());
    assert!(pages(&dirty.dirty_pages().unwrap()).is_empty());

    let running = Running::start(vm);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem.read_obj::<u32>(GuestAddress(PAGE_B + 0x10)).unwrap() != 0xb2b2_b2b2 {
        assert!(Instant::now() < deadline, "the guest never wrote page B");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        pages(&dirty.dirty_pages().unwrap()),
        BTreeSet::from([PAGE_A, PAGE_B]),
        "KVM's log should hold exactly the two pages the guest wrote"
    );
    // Re-armed: the guest only reads now, so nothing is dirty.
    std::thread::sleep(Duration::from_millis(20));
    assert!(pages(&dirty.dirty_pages().unwrap()).is_empty());

    // A host write (through vm-memory, like a device's) lets the guest go on.
    mem.write_obj(1u32, GuestAddress(FLAG)).unwrap();
    assert_eq!(
        running.join().unwrap(),
        RunOutcome::Guest(devices::legacy::GuestExit::DebugExit(EXIT))
    );
    // FLAG from the bitmap (host write), C from KVM's log (guest write), after the first read.
    assert_eq!(
        pages(&dirty.dirty_pages().unwrap()),
        BTreeSet::from([FLAG, PAGE_C])
    );
    dirty.stop().unwrap();
    assert!(!dirty.is_logging());
}

/// The hex bytes of a `PROBE rng ok bytes=<hex>` line.
fn rng_bytes(serial: &str) -> Vec<u8> {
    let hex = serial
        .lines()
        .find_map(|l| l.strip_prefix("PROBE rng ok bytes="))
        .unwrap_or_else(|| panic!("no rng line in\n{serial}"));
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[test]
fn a_virtio_rng_write_shows_up_in_the_bitmap() {
    let Some(probe) = probe("a_virtio_rng_write_shows_up_in_the_bitmap") else {
        return;
    };
    let s = Scratch::new("dirty-rng");
    let log = s.path("serial.log");
    let mut cfg = VmConfig::new(probe);
    cfg.cmdline = "pv.tests=rng".into();
    cfg.memory_mib = 64;
    cfg.rng = true;
    cfg.serial = SerialConfig::File(log.clone());
    let vm = Vm::new(&cfg).unwrap();
    let mem = vm.guest_memory();
    let dirty = vm.dirty_log();
    // KVM's log stays off: what is dirty afterwards was written by the VMM's devices.
    dirty.dirty_pages().unwrap();
    let outcome = Running::start(vm).join().unwrap();
    let serial = std::fs::read_to_string(&log).unwrap();
    assert!(matches!(outcome, RunOutcome::Guest(_)), "{serial}");
    let random = rng_bytes(&serial);
    assert_eq!(random.len(), 32);

    let written = pages(&dirty.dirty_pages().unwrap());
    let holds_random = |page: u64| {
        let mut buf = vec![0u8; 4096 + 32];
        let len = buf.len();
        mem.read_slice(&mut buf[..len], GuestAddress(page)).is_ok()
            && buf[..4096 + 31].windows(32).any(|w| w == random)
    };
    assert!(
        written.iter().any(|&p| holds_random(p)),
        "the page virtio-rng filled is not in the bitmap ({} dirty pages)",
        written.len()
    );
    // Only device writes (buffers, used rings), not the guest's own.
    assert!(written.len() < 32, "{} pages", written.len());
}
