//! A snapshot sent as a byte stream over a unix socket and restored in a new VM: the probe's
//! counter goes on; a damaged stream is refused before any guest runs.

mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::Path;

use vmm::{Request, RestoreOverrides, RunOutcome, SerialConfig, Vm, VmConfig};

use common::{probe, wait_for, Running, Scratch};

use common::last_counter_in as last_counter;

/// Asks `vm` for a stream snapshot on a fresh socket and hands the connection to `receive`.
fn stream_snapshot<T>(
    vm: &Running,
    socket: &Path,
    resume: bool,
    receive: impl FnOnce(&mut dyn Read) -> T,
) -> (T, String) {
    let listener = UnixListener::bind(socket).unwrap();
    let control = vm.control.clone();
    let req = Request::SnapshotStream {
        socket: socket.to_path_buf(),
        resume,
    };
    let sender = std::thread::spawn(move || control.call(req));
    let (mut conn, _) = listener.accept().unwrap();
    let received = receive(&mut conn);
    // Whatever `receive` left unread, the sender must still be able to finish.
    drop(conn);
    let answer = sender.join().unwrap().expect("the snapshot was not sent");
    std::fs::remove_file(socket).unwrap();
    (received, answer)
}

#[test]
fn counter_continues_from_a_streamed_snapshot_and_damage_is_refused() {
    let Some(probe) = probe("counter_continues_from_a_streamed_snapshot") else {
        return;
    };
    let s = Scratch::new("stream");
    let (log_a, log_b) = (s.path("a.log"), s.path("b.log"));
    let mut cfg = VmConfig::new(probe);
    cfg.cmdline = "pv.mode=counter pv.counter.ms=20".into();
    cfg.memory_mib = 64;
    cfg.rng = true;
    cfg.serial = SerialConfig::File(log_a.clone());
    let a = Running::start(Vm::new(&cfg).unwrap());
    wait_for(&log_a, "PROBE counter 3\n");

    // A first stream, kept as bytes (the VM goes on), to damage.
    let (bytes, answer) = stream_snapshot(&a, &s.path("s1.sock"), true, |r| {
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    });
    assert!(answer.contains("memory_written="), "{answer}");
    assert!(
        &bytes[..8] == b"PVSTREAM" && bytes.len() > 4096,
        "{}",
        bytes.len()
    );
    let quiet = RestoreOverrides {
        serial: Some(SerialConfig::None),
        ..Default::default()
    };
    let refused = |bad: &[u8], what: &str| {
        let e = Vm::restore_stream(&mut &bad[..], &quiet)
            .err()
            .unwrap_or_else(|| panic!("{what} was accepted"));
        e.to_string()
    };
    // A flipped byte anywhere: magic, state, a memory page in the middle, the trailer.
    for at in [
        0,
        20,
        200,
        bytes.len() / 2,
        bytes.len() - 40,
        bytes.len() - 1,
    ] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x04;
        let e = refused(&bad, &format!("a flip at byte {at}"));
        assert!(e.contains("snapshot"), "flip at {at}: {e}");
    }
    let e = refused(&bytes[..bytes.len() - 100], "a truncated stream");
    assert!(e.contains("ends"), "{e}");
    // The intact bytes restore (and the VM is dropped unrun).
    Vm::restore_stream(&mut &bytes[..], &quiet).unwrap();

    // A second stream, restored straight from the socket while the sender writes; the
    // source stays paused, so its counter stops where the snapshot was taken.
    let b_overrides = RestoreOverrides {
        serial: Some(SerialConfig::File(log_b.clone())),
        ..Default::default()
    };
    let (restored, _) = stream_snapshot(&a, &s.path("s2.sock"), false, |r| {
        Vm::restore_stream(r, &b_overrides)
    });
    let restored = restored.unwrap();
    let at_snapshot = std::fs::read_to_string(&log_a).unwrap();
    let stopped_at = last_counter(&at_snapshot);
    // The pause may fall inside a line (the guest writes it a byte at a time): the restored
    // guest then writes the rest of it.
    let partial = at_snapshot.rsplit_once('\n').map_or("", |(_, rest)| rest);
    assert_eq!(a.stop().unwrap(), RunOutcome::Stopped);
    assert_eq!(
        last_counter(&std::fs::read_to_string(&log_a).unwrap()),
        stopped_at
    );

    assert!(
        restored.config().rng,
        "the restored VM has the source's devices"
    );
    let b = Running::start(restored);
    let text = wait_for(&log_b, &format!("PROBE counter {}\n", stopped_at + 2));
    assert!(
        !text.contains("PROBE ready") && !text.contains("PROBE counter 0\n"),
        "the guest booted again instead of going on:\n{text}"
    );
    assert_eq!(
        text.lines().next().map(|rest| format!("{partial}{rest}")),
        Some(format!("PROBE counter {}", stopped_at + 1)),
        "{partial:?} then\n{text}"
    );
    assert_eq!(b.stop().unwrap(), RunOutcome::Stopped);
}
