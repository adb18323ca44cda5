//! virtio-gpu control and cursor commands from a hostile ring.
//! Input layout: `devices::fuzzing::gpu`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::fuzzing::gpu(data));
