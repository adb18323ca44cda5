//! A frame proxy: a migration carried between two authenticated channels under different
//! keys. The cloud host terminates a device's channel (TLS and the device's key) and runs the
//! twin's VMM jailed, reached over a unix socket with a fresh key of its own: every frame is
//! checked on the side it arrives (MAC, sequence, version), must be one that side may send at
//! that point of the protocol, and is sent on, re-authenticated, on the other side. The
//! payloads are not interpreted: the destination checks them as any receive does.
//!
//! The proxy follows the protocol's turns: it passes the source's frames until one the
//! source waits an answer for (`Setup`, `RoundEnd`, `State`, `Commit`), then passes the
//! destination's answer (`Base`, `RoundAck`, `Ready`, `Running`). An `Abort` from either side
//! is passed on and ends the migration; so does a frame out of turn, the other side told why.

use super::tls::Transport;
use super::wire::{Channel, Kind};
use super::{abort_reason, expect_within, refused, BASE_WAIT};
use crate::Error;

/// What a proxied migration carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Proxied {
    /// Frames from the source to the destination.
    pub to_destination: u64,
    /// Frames from the destination to the source.
    pub to_source: u64,
}

/// Bytes to the destination after which a proxy passes its kill point: for a return, past
/// the hello and the `Setup`, in the first round.
const KILL_AFTER: u64 = 64 << 10;

/// How long the proxy waits for the destination's answer to `frame`: a `Base` may take a
/// destination minutes (it digests a kept copy), everything else the usual I/O timeout.
fn answer_wait(frame: Kind) -> Option<std::time::Duration> {
    (frame == Kind::Setup).then_some(BASE_WAIT)
}

/// The destination's answer to the source's `frame`, if the source waits for one.
fn answer_to(frame: Kind) -> Option<Kind> {
    match frame {
        Kind::Setup => Some(Kind::Base),
        Kind::RoundEnd => Some(Kind::RoundAck),
        Kind::State => Some(Kind::Ready),
        Kind::Commit => Some(Kind::Running),
        _ => None,
    }
}

/// Carries one migration from `source` to `destination` (both after their handshakes) until
/// the destination answers `Running`, which is then passed on (best effort: the guest runs
/// at the destination even if the source does not hear it, as in a direct migration).
/// `setup`, when given, is the source's `Setup` payload, already read from `source` (the
/// cloud host looks at it before it starts the destination). `kill_point`, when given, is
/// the crash tests' point passed once 64 KiB went to the destination (see `fault`). On an
/// error both ends that are still in the migration are sent an `Abort` with the reason.
pub fn proxy(
    source: &mut Channel<Transport>,
    destination: &mut Channel<Transport>,
    setup: Option<Vec<u8>>,
    kill_point: Option<&str>,
) -> Result<Proxied, Error> {
    let mut counts = Proxied::default();
    let result = carry(source, destination, setup, kill_point, &mut counts);
    if let Err(e) = &result {
        let why = super::reason(e);
        for ch in [source, destination] {
            let _ = ch.send(Kind::Abort, why.as_bytes());
            let _ = ch.flush();
        }
    }
    result.map(|()| counts)
}

fn carry(
    source: &mut Channel<Transport>,
    destination: &mut Channel<Transport>,
    setup: Option<Vec<u8>>,
    kill_point: Option<&str>,
    counts: &mut Proxied,
) -> Result<(), Error> {
    let mut first = setup.map(|payload| (Kind::Setup, payload));
    // Until the `Setup`, nothing else may come from the source.
    let mut set_up = false;
    loop {
        let (kind, payload) = match first.take() {
            Some(f) => f,
            None => {
                let f = source.recv().map_err(|e| from_side("source", e))?;
                (f.kind, f.payload)
            }
        };
        let allowed = match kind {
            Kind::Setup => !set_up,
            Kind::Pages | Kind::Disk | Kind::RoundEnd | Kind::State | Kind::Commit => set_up,
            Kind::Abort => return Err(refused(format!("the source: {}", abort_reason(&payload)))),
            _ => false,
        };
        if !allowed {
            return Err(refused(format!(
                "the source sent a {kind:?} frame out of turn"
            )));
        }
        set_up = true;
        let before = destination.bytes_sent;
        destination
            .send(kind, &payload)
            .map_err(|e| from_side("destination", e))?;
        counts.to_destination += 1;
        if let Some(point) = kill_point {
            if before < KILL_AFTER && destination.bytes_sent >= KILL_AFTER {
                super::fault::kill_point(point);
            }
        }
        let Some(answer) = answer_to(kind) else {
            continue;
        };
        destination
            .flush()
            .map_err(|e| from_side("destination", e))?;
        let got = match answer_wait(kind) {
            Some(wait) => expect_within(destination, answer, wait),
            None => super::expect(destination, answer),
        }
        .map_err(|e| refused(format!("the destination: {}", super::reason(&e))))?;
        let sent = source.send(answer, &got).and_then(|()| source.flush());
        if answer == Kind::Running {
            // The destination runs the guest: that is the outcome, heard by the source or not.
            counts.to_source += u64::from(sent.is_ok());
            return Ok(());
        }
        sent.map_err(|e| from_side("source", e))?;
        counts.to_source += 1;
    }
}

/// An error of the channel to `side`, in words that say which.
fn from_side(side: &str, e: super::wire::WireError) -> Error {
    refused(format!("the {side}: {e}"))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;

    use super::super::wire::{Role, HEADER_LEN};
    use super::*;

    const DEVICE_KEY: [u8; 32] = [1; 32];
    const LOCAL_KEY: [u8; 32] = [2; 32];

    /// A proxy on its own thread between two socket pairs: the source's end, the
    /// destination's end (neither has said hello yet) and the proxy's thread.
    fn proxy_between() -> (UnixStream, UnixStream, JoinHandle<Result<Proxied, Error>>) {
        let (s, ps) = UnixStream::pair().unwrap();
        let (pd, d) = UnixStream::pair().unwrap();
        let proxy = std::thread::spawn(move || {
            let mut from =
                Channel::handshake(Transport::Local(ps), &DEVICE_KEY, Role::Destination)?;
            let mut to = Channel::handshake(Transport::Local(pd), &LOCAL_KEY, Role::Source)?;
            proxy(&mut from, &mut to, None, None)
        });
        (s, d, proxy)
    }

    /// A source on one socket pair, a destination on another, the proxy between them: the
    /// source's and destination's channels, and the proxy's thread.
    fn three() -> (
        Channel<Transport>,
        Channel<Transport>,
        JoinHandle<Result<Proxied, Error>>,
    ) {
        let (s, d, proxy) = proxy_between();
        let dst = std::thread::spawn(move || {
            Channel::handshake(Transport::Local(d), &LOCAL_KEY, Role::Destination).unwrap()
        });
        let src = Channel::handshake(Transport::Local(s), &DEVICE_KEY, Role::Source).unwrap();
        (src, dst.join().unwrap(), proxy)
    }

    #[test]
    fn a_migration_goes_through_turn_by_turn() {
        let (mut s, mut d, proxy) = three();
        s.send(Kind::Setup, b"{}").unwrap();
        s.flush().unwrap();
        assert_eq!(d.recv().unwrap().payload, b"{}");
        d.send(Kind::Base, b"").unwrap();
        d.flush().unwrap();
        assert_eq!(s.recv().unwrap().kind, Kind::Base);
        s.send(Kind::Pages, &[5; 3000]).unwrap();
        s.send(Kind::Disk, &[6; 10]).unwrap();
        s.send(Kind::RoundEnd, &[]).unwrap();
        s.flush().unwrap();
        assert_eq!(d.recv().unwrap().payload, vec![5; 3000]);
        assert_eq!(d.recv().unwrap().kind, Kind::Disk);
        assert_eq!(d.recv().unwrap().kind, Kind::RoundEnd);
        d.send(Kind::RoundAck, &[]).unwrap();
        d.flush().unwrap();
        assert_eq!(s.recv().unwrap().kind, Kind::RoundAck);
        for (ask, answer) in [(Kind::State, Kind::Ready), (Kind::Commit, Kind::Running)] {
            s.send(ask, b"x").unwrap();
            s.flush().unwrap();
            assert_eq!(d.recv().unwrap().kind, ask);
            d.send(answer, &[]).unwrap();
            d.flush().unwrap();
            assert_eq!(s.recv().unwrap().kind, answer);
        }
        let counts = proxy.join().unwrap().unwrap();
        assert_eq!(
            counts,
            Proxied {
                to_destination: 6,
                to_source: 4
            }
        );
    }

    #[test]
    fn a_flipped_byte_from_the_source_is_refused_and_both_sides_told() {
        let (s, d, proxy) = proxy_between();
        let dst = std::thread::spawn(move || {
            Channel::handshake(Transport::Local(d), &LOCAL_KEY, Role::Destination).unwrap()
        });
        // The source speaks through a tap that flips a payload byte of its second frame.
        let (tap, s_inner) = UnixStream::pair().unwrap();
        let flipper = std::thread::spawn(move || flip_second_frame(s_inner, s));
        let mut src = Channel::handshake(Transport::Local(tap), &DEVICE_KEY, Role::Source).unwrap();
        let mut d = dst.join().unwrap();
        src.send(Kind::Setup, b"{}").unwrap();
        src.flush().unwrap();
        assert_eq!(d.recv().unwrap().kind, Kind::Setup);
        d.send(Kind::Base, b"").unwrap();
        d.flush().unwrap();
        assert_eq!(src.recv().unwrap().kind, Kind::Base);
        src.send(Kind::Pages, &[9; 100]).unwrap();
        src.flush().unwrap();
        let err = proxy.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
        // The destination never sees the damaged frame: it is told to give up instead.
        let f = d.recv().unwrap();
        assert_eq!(f.kind, Kind::Abort);
        assert!(String::from_utf8_lossy(&f.payload).contains("the source"));
        assert_eq!(src.recv().unwrap().kind, Kind::Abort);
        drop(src);
        flipper.join().unwrap();
    }

    /// Copies bytes both ways between `a` (the source's end) and `b` (the proxy's), flipping
    /// the last payload byte of the second frame the source sends (after its hello).
    fn flip_second_frame(a: UnixStream, b: UnixStream) {
        let (mut a_r, mut b_w) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let (mut b_r, mut a_w) = (b, a);
            let _ = std::io::copy(&mut b_r, &mut a_w);
            let _ = a_w.shutdown(std::net::Shutdown::Write);
        });
        let mut hello = [0u8; super::super::wire::HELLO_LEN];
        a_r.read_exact(&mut hello).unwrap();
        b_w.write_all(&hello).unwrap();
        for n in 0.. {
            let mut header = [0u8; HEADER_LEN];
            if a_r.read_exact(&mut header).is_err() {
                break;
            }
            let len = u32::from_le_bytes(header[16..20].try_into().unwrap()) as usize;
            let mut rest = vec![0u8; len + super::super::wire::MAC_LEN];
            a_r.read_exact(&mut rest).unwrap();
            if n == 1 {
                rest[0] ^= 0x40;
            }
            if b_w
                .write_all(&header)
                .and_then(|()| b_w.write_all(&rest))
                .is_err()
            {
                break;
            }
        }
        let _ = b_w.shutdown(std::net::Shutdown::Write);
        back.join().unwrap();
    }

    #[test]
    fn a_flipped_byte_from_the_destination_is_refused_and_both_sides_told() {
        let (s, d, proxy) = proxy_between();
        // The destination answers through a tap that flips a byte of its second frame.
        let (tap, d_inner) = UnixStream::pair().unwrap();
        let flipper = std::thread::spawn(move || flip_second_frame(d_inner, d));
        let dst = std::thread::spawn(move || {
            Channel::handshake(Transport::Local(tap), &LOCAL_KEY, Role::Destination).unwrap()
        });
        let mut src = Channel::handshake(Transport::Local(s), &DEVICE_KEY, Role::Source).unwrap();
        let mut d = dst.join().unwrap();
        src.send(Kind::Setup, b"{}").unwrap();
        src.flush().unwrap();
        d.recv().unwrap();
        d.send(Kind::Base, b"").unwrap();
        d.flush().unwrap();
        assert_eq!(src.recv().unwrap().kind, Kind::Base);
        src.send(Kind::RoundEnd, &[]).unwrap();
        src.flush().unwrap();
        d.recv().unwrap();
        d.send(Kind::RoundAck, b"z").unwrap();
        d.flush().unwrap();
        let err = proxy.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
        let f = src.recv().unwrap();
        assert_eq!(f.kind, Kind::Abort, "the source is told, not acknowledged");
        assert!(String::from_utf8_lossy(&f.payload).contains("the destination"));
        assert_eq!(d.recv().unwrap().kind, Kind::Abort);
        drop(d);
        drop(src);
        flipper.join().unwrap();
    }

    #[test]
    fn a_frame_out_of_turn_is_refused() {
        let (mut s, mut d, proxy) = three();
        // Pages before the setup: not a migration.
        s.send(Kind::Pages, &[1; 8]).unwrap();
        s.flush().unwrap();
        let err = proxy.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("out of turn"), "{err}");
        assert_eq!(s.recv().unwrap().kind, Kind::Abort);
        assert_eq!(d.recv().unwrap().kind, Kind::Abort);
    }

    #[test]
    fn an_abort_is_passed_on_with_its_reason() {
        let (mut s, mut d, proxy) = three();
        s.send(Kind::Setup, b"{}").unwrap();
        s.flush().unwrap();
        d.recv().unwrap();
        d.send(Kind::Abort, b"no room").unwrap();
        d.flush().unwrap();
        let err = proxy.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("no room"), "{err}");
        let f = s.recv().unwrap();
        assert_eq!(f.kind, Kind::Abort);
        assert!(String::from_utf8_lossy(&f.payload).contains("no room"));
    }
}
