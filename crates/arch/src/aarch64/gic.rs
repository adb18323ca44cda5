//! KVM's in-kernel GICv3 and its ITS (the interrupt translation service that turns a PCI
//! device's MSI write into an LPI).
//!
//! The order KVM requires: the vGIC device is created before any irqfd or GSI route (they
//! need an in-kernel irqchip), its addresses and line count are set, the vCPUs are created and
//! initialised, and only then is the vGIC initialised (`KVM_DEV_ARM_VGIC_CTRL_INIT`), before
//! the first `KVM_RUN`. [`Platform`] holds the device fds from [`create`] to
//! [`Platform::vcpus_created`].

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_vcpu_init, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_VGIC_ITS_ADDR_TYPE, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, VmFd};

use super::layout::{GIC_DIST_START, GIC_ITS_START, GIC_NR_IRQS, GIC_REDIST_START};
use super::{kvm_err, Error};

/// The VM's platform as KVM holds it: the vGIC, its ITS and the vCPU target.
pub struct Platform {
    /// The vGICv3.
    pub(super) gic: DeviceFd,
    /// The ITS (KVM emulates one wherever it emulates a GICv3).
    pub(super) its: DeviceFd,
    /// What `KVM_ARM_PREFERRED_TARGET` said, the base of every vCPU's `KVM_ARM_VCPU_INIT`.
    pub(super) vcpu_target: kvm_vcpu_init,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("vcpu_target", &self.vcpu_target.target)
            .finish()
    }
}

/// Sets one attribute of a vGIC or ITS device; `value` is what the kernel reads through
/// `addr` (an address or a count), `None` for the control group.
fn set_attr(dev: &DeviceFd, group: u32, attr: u32, value: Option<&u64>) -> Result<(), Error> {
    let what = match group {
        KVM_DEV_ARM_VGIC_GRP_ADDR => "KVM_SET_DEVICE_ATTR (GIC address)",
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS => "KVM_SET_DEVICE_ATTR (GIC lines)",
        _ => "KVM_SET_DEVICE_ATTR (GIC init)",
    };
    let attr = kvm_device_attr {
        group,
        attr: u64::from(attr),
        // The kernel reads the value through this address during the ioctl; `value` outlives it.
        addr: value.map_or(0, |v| v as *const u64 as u64),
        flags: 0,
    };
    dev.set_device_attr(&attr).map_err(kvm_err(what))
}

/// Creates the vGICv3 (distributor and redistributors where `layout` puts them,
/// [`GIC_NR_IRQS`] lines) and its ITS; reads the vCPU target.
pub fn create(vm: &VmFd) -> Result<Platform, Error> {
    let mut vcpu_target = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut vcpu_target)
        .map_err(kvm_err("KVM_ARM_PREFERRED_TARGET"))?;

    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm
        .create_device(&mut dev)
        .map_err(kvm_err("KVM_CREATE_DEVICE (GICv3)"))?;
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_V3_ADDR_TYPE_DIST,
        Some(&GIC_DIST_START),
    )?;
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_V3_ADDR_TYPE_REDIST,
        Some(&GIC_REDIST_START),
    )?;
    // The line count attribute is a u32; a u64 holding it reads the same on little endian.
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        Some(&u64::from(GIC_NR_IRQS)),
    )?;

    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
        fd: 0,
        flags: 0,
    };
    let its = vm
        .create_device(&mut dev)
        .map_err(kvm_err("KVM_CREATE_DEVICE (GICv3 ITS)"))?;
    set_attr(
        &its,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_ITS_ADDR_TYPE,
        Some(&GIC_ITS_START),
    )?;
    set_attr(
        &its,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        KVM_DEV_ARM_VGIC_CTRL_INIT,
        None,
    )?;
    Ok(Platform {
        gic,
        its,
        vcpu_target,
    })
}

impl Platform {
    /// Initialises the vGIC once every vCPU exists and is initialised (before the first run).
    pub fn vcpus_created(&self) -> Result<(), Error> {
        set_attr(
            &self.gic,
            KVM_DEV_ARM_VGIC_GRP_CTRL,
            KVM_DEV_ARM_VGIC_CTRL_INIT,
            None,
        )
    }
}
