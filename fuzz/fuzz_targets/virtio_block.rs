//! virtio-blk requests (header, sector range, data, status) from a hostile ring.
//! Input layout: `devices::fuzzing::block`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::fuzzing::block(data));
