//! The physical limit of an MMIO exit round trip on arm64 KVM, for the nested arm64 check
//! `mmio_exits_round_trip_on_arm64_pocketvisor_vs_raw_kvm`: `rawexit-arm64 IMAGE` loads an
//! arm64 `Image` at 0x4000_0000 (pocketvisor's RAM base) in a VM of 32 MiB with one vCPU
//! (PSCI 0.2, no irqchip, no devices), starts it at the Image's first byte and answers every
//! MMIO exit with nothing (reads as zeros) until the guest's PSCI `SYSTEM_OFF`. It prints
//! `RAW mmio_exits=<n>` and exits 0, or 1 with an error. Built for aarch64 only
//! (`cargo build --target aarch64-unknown-linux-musl -p rawexit-arm64`); elsewhere it says so.

#[cfg(target_arch = "aarch64")]
mod raw {
    use anyhow::{bail, Context, Result};
    use kvm_bindings::{
        kvm_userspace_memory_region, kvm_vcpu_init, KVM_ARM_VCPU_PSCI_0_2, KVM_REG_ARM64,
        KVM_REG_ARM_CORE, KVM_REG_SIZE_U64,
    };
    use kvm_ioctls::{Kvm, VcpuExit};

    const RAM_START: u64 = 0x4000_0000;
    const RAM_SIZE: usize = 32 << 20;
    /// The ONE_REG id of the vCPU's PC (`struct kvm_regs`: 31 general registers and SP
    /// before it, 8 bytes each; core register ids count 32-bit words).
    const PC: u64 = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (256 / 4);

    /// Anonymous guest memory, unmapped on drop.
    struct Ram(*mut u8);

    impl Ram {
        fn new() -> Result<Ram> {
            // SAFETY: a fresh private anonymous mapping; the result is checked before use.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    RAM_SIZE,
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
    }

    impl Drop for Ram {
        fn drop(&mut self) {
            // SAFETY: unmaps the mapping made in `new`; the VM using it is gone by now
            // (declared after it, so dropped first).
            unsafe { libc::munmap(self.0.cast(), RAM_SIZE) };
        }
    }

    /// Runs `image`; the number of MMIO exits before the guest powered off.
    pub fn run(image: &[u8]) -> Result<u64> {
        if image.len() > RAM_SIZE {
            bail!("the image is larger than the VM's {RAM_SIZE} bytes");
        }
        let ram = Ram::new()?;
        // SAFETY: `image` fits in the mapping (checked above), which `ram` owns.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), ram.0, image.len()) };
        let kvm = Kvm::new().context("open /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: RAM_START,
            memory_size: RAM_SIZE as u64,
            userspace_addr: ram.0 as u64,
        };
        // SAFETY: the region is `ram`'s mapping, which outlives the VM (dropped after it).
        unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
        let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        let mut init = kvm_vcpu_init::default();
        vm.get_preferred_target(&mut init)
            .context("KVM_ARM_PREFERRED_TARGET")?;
        init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
        vcpu.vcpu_init(&init).context("KVM_ARM_VCPU_INIT")?;
        vcpu.set_one_reg(PC, &RAM_START.to_le_bytes())
            .context("set PC")?;
        let mut exits = 0u64;
        loop {
            match vcpu.run().context("KVM_RUN")? {
                VcpuExit::MmioWrite(..) => exits += 1,
                VcpuExit::MmioRead(_, data) => {
                    data.fill(0);
                    exits += 1;
                }
                VcpuExit::SystemEvent(..) => return Ok(exits),
                other => bail!("unexpected exit {other:?}"),
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    let path = std::env::args_os()
        .nth(1)
        .context("usage: rawexit-arm64 IMAGE")?;
    let image = std::fs::read(&path).with_context(|| format!("read {path:?}"))?;
    let exits = raw::run(&image)?;
    println!("RAW mmio_exits={exits}");
    Ok(())
}

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("rawexit-arm64 drives arm64 KVM: build it for aarch64");
    std::process::exit(2);
}
