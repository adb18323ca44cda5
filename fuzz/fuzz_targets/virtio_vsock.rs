//! virtio-vsock packets (header, op, ports, credit) and rx/event buffers from a hostile ring.
//! Input layout: `devices::fuzzing::vsock`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::fuzzing::vsock(data));
