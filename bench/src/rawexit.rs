//! The physical limit of a port-I/O exit round trip: a minimal VM (one vCPU in 64-bit mode,
//! 2 MiB of RAM, no irqchip, no devices) whose guest runs `out 0x80, al; jmp .-2` forever,
//! driven by a bare loop of `KVM_RUN` ioctls that does nothing with each exit but check it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};

const MEM_SIZE: usize = 2 << 20;
const PML4: usize = 0x1000;
const PDPT: usize = 0x2000;
const PD: usize = 0x3000;
const GDT: usize = 0x500;
const CODE: usize = 0x10000;
/// `out 0x80, al; jmp` back to the out: the least a guest can do between two exits.
pub const LOOP_MINIMAL: &[u8] = &[0xE6, 0x80, 0xEB, 0xFC];
/// `out 0x80, al; dec rcx; jnz` back to the out: the probe's pio-bench loop, instruction for
/// instruction (`guest/probe/src/bench.rs`), 2 more guest instructions per exit.
pub const LOOP_COUNTED: &[u8] = &[0xE6, 0x80, 0x48, 0xFF, 0xC9, 0x75, 0xF9];

/// Anonymous memory unmapped on drop.
struct Ram(*mut u8);

impl Ram {
    fn new() -> Result<Ram> {
        // SAFETY: a fresh private anonymous mapping; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        Ok(Ram(p.cast()))
    }

    fn write(&mut self, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= MEM_SIZE);
        // SAFETY: the range is inside the mapping (asserted), which this struct owns.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(at), bytes.len()) }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, used by nothing after this.
        unsafe { libc::munmap(self.0.cast(), MEM_SIZE) };
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Microseconds per exit over `iters` round trips of the guest `code` (a loop that writes
/// port 0x80 once per iteration), after 1000 warm-up exits.
pub fn round_trip_us(code: &[u8], iters: u64) -> Result<f64> {
    // Declared before the VM, so it is unmapped after the VM is gone on every path.
    let mut ram = Ram::new()?;
    let kvm = Kvm::new().context("open /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    vm.set_tss_address(0xFFFB_D000)
        .context("KVM_SET_TSS_ADDR")?;
    // Identity map of the first 2 MiB (one 2 MiB page), a flat 64-bit GDT, the loop.
    ram.write(PML4, &(PDPT as u64 | 3).to_le_bytes());
    ram.write(PDPT, &(PD as u64 | 3).to_le_bytes());
    ram.write(PD, &0x83u64.to_le_bytes());
    for (i, d) in [0u64, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF]
        .iter()
        .enumerate()
    {
        ram.write(GDT + 8 * i, &d.to_le_bytes());
    }
    ram.write(CODE, code);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: ram.0 as u64,
    };
    // SAFETY: the region is a live mapping of MEM_SIZE bytes that outlives the VM (`ram` is
    // declared first, so it is dropped last).
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;

    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    sregs.cs = segment(0x8, true);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = segment(0x10, false);
    }
    sregs.gdt.base = GDT as u64;
    sregs.gdt.limit = 23;
    sregs.cr3 = PML4 as u64;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0033; // PG, NE, ET, MP, PE
    sregs.efer = 0x500; // LME, LMA
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
    regs.rip = CODE as u64;
    regs.rsp = 0x8000;
    regs.rflags = 2;
    regs.rcx = u64::MAX; // LOOP_COUNTED counts it down
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;

    let mut exit_once = || -> Result<()> {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0x80, _)) => Ok(()),
            Ok(other) => bail!("unexpected exit {other:?}"),
            Err(e) => bail!("KVM_RUN: {e}"),
        }
    };
    for _ in 0..1000 {
        exit_once()?;
    }
    let t0 = Instant::now();
    for _ in 0..iters {
        exit_once()?;
    }
    let took: Duration = t0.elapsed();
    Ok(took.as_secs_f64() * 1e6 / iters.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prints both loops' round trips: `cargo test -p bench --release rawexit -- --ignored
    /// --nocapture` (needs /dev/kvm).
    #[test]
    #[ignore = "needs /dev/kvm; prints figures"]
    fn minimal_and_counted_loops() {
        for _ in 0..3 {
            let a = round_trip_us(LOOP_MINIMAL, 20_000).unwrap();
            let b = round_trip_us(LOOP_COUNTED, 20_000).unwrap();
            println!("minimal {a:.2} us, counted {b:.2} us");
            assert!(a > 0.0 && b > 0.0);
        }
    }
}

/// Milliseconds `KVM_SET_USER_MEMORY_REGION` takes for a fresh VM and `mib` MiB of anonymous
/// memory (nothing touched): the part of a restore that grows with guest RAM.
pub fn set_memory_region_ms(mib: usize) -> Result<f64> {
    let len = mib << 20;
    // SAFETY: a fresh private anonymous mapping; the result is checked before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    let result = (|| {
        let kvm = Kvm::new().context("open /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: len as u64,
            userspace_addr: p as u64,
        };
        let t0 = Instant::now();
        // SAFETY: the mapping is live for `len` bytes until after the VM is dropped below.
        unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    })();
    // SAFETY: unmaps the mapping made above; the VM that used it is gone.
    unsafe { libc::munmap(p, len) };
    result
}

#[cfg(test)]
mod memslot_tests {
    /// Prints how long registering guest RAM takes per size: `cargo test -p bench --release
    /// memslot -- --ignored --nocapture` (needs /dev/kvm).
    #[test]
    #[ignore = "needs /dev/kvm; prints figures"]
    fn memslot_time_per_size() {
        for mib in [64, 256, 1024, 64, 256, 1024] {
            let t = super::set_memory_region_ms(mib).unwrap();
            println!("{mib} MiB: {t:.2} ms");
        }
    }
}
