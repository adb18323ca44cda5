//! The input device's own snapshot state: the config selector the driver wrote and the
//! events injected but not yet delivered, so a restored guest misses no key or touch.
//!
//! Layout (little-endian): version, kind (0 keyboard, 1 touch), select, subsel, event count
//! (u32), then 8 bytes per event as the driver receives it.

use std::collections::VecDeque;

use super::{InputEvent, InputKind, MAX_PENDING};
use crate::virtio::StateError;

/// Format version written by [`encode`].
const VERSION: u8 = 1;
const HEADER: usize = 8;
const EVENT: usize = 8;

fn kind_tag(kind: InputKind) -> u8 {
    match kind {
        InputKind::Keyboard => 0,
        InputKind::Touch { .. } => 1,
    }
}

/// What a restored device takes over.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Saved {
    pub select: u8,
    pub subsel: u8,
    pub pending: VecDeque<InputEvent>,
}

/// Serializes a paused device's state.
pub(super) fn encode(
    kind: InputKind,
    select: u8,
    subsel: u8,
    pending: &VecDeque<InputEvent>,
) -> Vec<u8> {
    let mut v = vec![VERSION, kind_tag(kind), select, subsel];
    // At most MAX_PENDING events wait: the count fits.
    v.extend_from_slice(
        &u32::try_from(pending.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for e in pending {
        v.extend_from_slice(&e.bytes());
    }
    v
}

/// Parses and checks state saved by [`encode`] for a device of `kind`. Empty state (a
/// snapshot from before input devices kept any) is a device with nothing pending.
pub(super) fn decode(kind: InputKind, bytes: &[u8]) -> Result<Saved, StateError> {
    if bytes.is_empty() {
        return Ok(Saved {
            select: 0,
            subsel: 0,
            pending: VecDeque::new(),
        });
    }
    let header: &[u8; HEADER] =
        bytes
            .get(..HEADER)
            .and_then(|h| h.try_into().ok())
            .ok_or(StateError::Length {
                got: bytes.len(),
                expected: HEADER,
            })?;
    let [version, tag, select, subsel, n0, n1, n2, n3] = *header;
    if version != VERSION {
        return Err(StateError::Version(version));
    }
    if tag != kind_tag(kind) {
        return Err(StateError::Invalid(
            "input state is of another kind of input device",
        ));
    }
    let count = usize::try_from(u32::from_le_bytes([n0, n1, n2, n3]))
        .ok()
        .filter(|&n| n <= MAX_PENDING)
        .ok_or(StateError::Invalid("too many pending input events"))?;
    let expected = HEADER + count * EVENT;
    if bytes.len() != expected {
        return Err(StateError::Length {
            got: bytes.len(),
            expected,
        });
    }
    let pending = bytes[HEADER..]
        .chunks_exact(EVENT)
        .map(|e| InputEvent {
            kind: u16::from_le_bytes([e[0], e[1]]),
            code: u16::from_le_bytes([e[2], e[3]]),
            value: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        })
        .collect();
    Ok(Saved {
        select,
        subsel,
        pending,
    })
}
