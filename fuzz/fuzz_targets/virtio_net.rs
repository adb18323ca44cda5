//! virtio-net transmit chains (header + frame) and receive buffers from a hostile ring.
//! Input layout: `devices::fuzzing::net`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::fuzzing::net(data));
