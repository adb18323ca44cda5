//! virtio-input event and status buffers from a hostile ring.
//! Input layout: `devices::fuzzing::input`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::fuzzing::input(data));
