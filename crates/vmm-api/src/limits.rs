//! The platform limits a configuration is checked against.
//!
//! They mirror `arch::layout` (which needs KVM to build); a test in `vmm` checks that both agree.

/// Smallest guest memory size accepted, in MiB (`arch::layout::MIN_MEMORY >> 20`).
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest memory size accepted, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Largest kernel command line, including its terminating NUL (`arch::layout::CMDLINE_MAX`).
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 254;
/// Smallest vsock context id a guest may have (0-2 are reserved).
pub const MIN_VSOCK_CID: u64 = 3;
/// Longest TAP interface name (`IFNAMSIZ` minus the NUL).
pub const MAX_TAP_NAME: usize = 15;
