//! A replica's sealed checkpoint files on a cloud host's channel (`replicate NAME CHAIN SEQ`
//! and `recover NAME`, see `pocketvisor cloud serve`): a file travels as `Checkpoint` frames
//! of at most [`PIECE`] bytes, then `CheckpointEnd` with its sequence number. The frames are
//! authenticated and numbered by the channel, so a file arrives whole and in order or not
//! at all; its contents are sealed by the device (the cloud host cannot read them).

use std::io::{Read, Write};

use super::tls::Transport;
use super::wire::{Channel, Kind};
use super::{abort_reason, refused};
use crate::Error;

/// The largest piece of a file in one frame.
pub const PIECE: usize = 1 << 20;

/// Sends the file read from `r` as checkpoint `seq`. Returns its size.
pub fn send_file(ch: &mut Channel<Transport>, r: &mut dyn Read, seq: u64) -> Result<u64, Error> {
    let mut buf = vec![0u8; PIECE];
    let mut total = 0u64;
    loop {
        let mut n = 0;
        while n < PIECE {
            match r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(got) => n += got,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(refused(format!("reading a checkpoint: {e}"))),
            }
        }
        if n == 0 {
            break;
        }
        ch.send(Kind::Checkpoint, &buf[..n])?;
        total += n as u64;
        if n < PIECE {
            break;
        }
    }
    ch.send(Kind::CheckpointEnd, &seq.to_le_bytes())?;
    ch.flush()?;
    Ok(total)
}

/// Receives one file into `w`, at most `max` bytes; `each` runs after every piece (a kill
/// point of the tests). Returns the sequence number its end gave and its size.
pub fn recv_file(
    ch: &mut Channel<Transport>,
    w: &mut dyn Write,
    max: u64,
    mut each: impl FnMut(u64),
) -> Result<(u64, u64), Error> {
    let mut total = 0u64;
    loop {
        let f = ch.recv()?;
        match f.kind {
            Kind::Checkpoint => {
                total += f.payload.len() as u64;
                if total > max {
                    return Err(refused(format!("a checkpoint of more than {max} bytes")));
                }
                w.write_all(&f.payload)
                    .map_err(|e| refused(format!("writing a checkpoint: {e}")))?;
                each(total);
            }
            Kind::CheckpointEnd => {
                let seq = <[u8; 8]>::try_from(f.payload.as_slice())
                    .map(u64::from_le_bytes)
                    .map_err(|_| refused("a malformed checkpoint end"))?;
                return Ok((seq, total));
            }
            Kind::Abort => return Err(refused(abort_reason(&f.payload))),
            other => {
                return Err(refused(format!(
                    "a {other:?} frame arrived within a checkpoint"
                )))
            }
        }
    }
}

/// Tells the device checkpoint `seq` is stored.
pub fn stored(ch: &mut Channel<Transport>, seq: u64) -> Result<(), Error> {
    ch.send(Kind::Stored, &seq.to_le_bytes())?;
    ch.flush()?;
    Ok(())
}

/// Waits for the host's word that checkpoint `seq` is stored.
pub fn expect_stored(ch: &mut Channel<Transport>, seq: u64) -> Result<(), Error> {
    let payload = super::expect(ch, Kind::Stored)?;
    if payload != seq.to_le_bytes() {
        return Err(refused(
            "the host stored another checkpoint than the one sent",
        ));
    }
    Ok(())
}

/// Ends the exchange on `ch` with `why` (an `Abort`), as a refused request does.
pub fn abort(ch: &mut Channel<Transport>, why: &str) {
    super::refuse_on_error::<()>(ch, &Err(refused(why)));
}
