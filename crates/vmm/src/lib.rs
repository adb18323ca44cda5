//! One virtual machine: `VmConfig` in, running VM out.
