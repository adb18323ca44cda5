//! virtio-balloon page lists (inflate, deflate, free page reports) and statistics buffers.
//! Input layout: `devices::fuzzing::balloon`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::fuzzing::balloon(data));
