//! The split-ring descriptor-chain walker (`devices::virtio::chain::parse_chain`) and the
//! `Chain` accessors: whatever the table holds, a chain is rejected or keeps its promises.
//! Input layout: `devices::fuzzing::chain`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devices::fuzzing::chain(data));
