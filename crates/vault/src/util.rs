//! Small I/O helpers.

use std::io::{ErrorKind, Read};

use crate::error::{Result, VaultError};

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
pub(crate) fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(VaultError::io("reading the profile file", e)),
        }
    }
    Ok(got)
}
