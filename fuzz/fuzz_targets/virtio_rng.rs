//! virtio-rng entropy requests from a hostile ring.
//! Input layout: `devices::fuzzing::rng`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::fuzzing::rng(data));
