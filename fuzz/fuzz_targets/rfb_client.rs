//! Bytes a VNC client sends after the handshake: every message the parser returns must have
//! a length inside the input, and the parser must never ask for more than one message.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match rfb::proto::parse_client_message(&data[at..]) {
            Ok(Some((_, len))) => {
                assert!(len > 0 && at + len <= data.len());
                at += len;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
