//! PCI configuration space writes and reads through 0xcf8/0xcfc and ECAM.
//! Input layout: `devices::fuzzing::pci_config`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::fuzzing::pci_config(data));
