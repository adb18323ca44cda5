//! Helpers shared by pocketvisor's end-to-end tests and its benchmark.
//!
//! - [`paths`]: where the `pocketvisor` binary, the probe guest and the Linux assets are.
//! - [`vm`]: spawning a VMM (pocketvisor or QEMU) with a deadline and collecting its serial lines.
//! - [`probe`]: parsing the probe guest's `PROBE ...` lines.
//! - [`host`]: host-side fixtures (temp dirs, disk images, FNV-1a, network namespaces, skips).
//! - [`elf`]: tiny hand-made PVH kernels for exit-path tests.
//! - [`qemu`]: the QEMU command line equivalent to a pocketvisor run.
//! - [`linux`]: the Debian Linux guest's `LINUX ...` lines and the assertions on them.
//! - [`nested`]: running commands in L1, a QEMU TCG machine with a hardware-style KVM.
//! - [`l1_watch`]: L1's heartbeat, and the report a hung L1 leaves behind.
//! - [`firmware`]: the firmware-booted Debian disk image and its check script.
//! - [`rfb_client`]: a minimal RFB 3.8 client (Raw and ZRLE) for the screen tests.

pub mod elf;
pub mod firmware;
pub mod host;
pub mod l1_watch;
pub mod linux;
pub mod nested;
pub mod paths;
pub mod probe;
pub mod qemu;
pub mod rfb_client;
pub mod vm;

pub use host::{fnv1a64, require_kvm, skip, TempDir};
pub use paths::{pocketvisor_bin, probe_elf, workspace_root};
pub use probe::{ProbeLine, ProbeReport};
pub use vm::{Outcome, RunningVm, VmCommand};
