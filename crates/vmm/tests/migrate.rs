//! Live migration between two VMs over TCP (the probe in counter mode): the counter goes on
//! at the destination; a damaged, dropped or replayed message, or another key, is refused and
//! the guest runs on at the source. A guest writing its disk all the while takes the disk
//! along: the destination's is the source's at the switch, and later writes land there.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use vmm::migration::wire::{HEADER_LEN, HELLO_LEN, MAC_LEN};
use vmm::{DiskConfig, Request, RestoreOverrides, RunOutcome, SerialConfig, Vm, VmConfig};

use common::{probe, wait_for, Running, Scratch};

/// The last `PROBE counter <n>` in the file at `log`.
/// The last complete `PROBE counter <n>` in the serial log at `log`.
fn last_counter(log: &Path) -> u64 {
    common::last_counter_in(&std::fs::read_to_string(log).unwrap())
}

fn write_key(path: &Path, byte: u8) -> PathBuf {
    std::fs::write(path, format!("{byte:02x}").repeat(32) + "\n").unwrap();
    path.to_path_buf()
}

/// A counting probe VM with a serial log at `log`.
fn counting_vm(probe: &Path, log: &Path) -> Running {
    let mut cfg = VmConfig::new(probe.to_path_buf());
    cfg.cmdline = "pv.mode=counter pv.counter.ms=20".into();
    cfg.memory_mib = 64;
    cfg.rng = true;
    cfg.serial = SerialConfig::File(log.to_path_buf());
    let vm = Running::start(Vm::new(&cfg).unwrap());
    wait_for(log, "PROBE counter 3\n");
    vm
}

/// A destination waiting on a fresh port: its address and the thread that receives (and
/// returns the VM it built, not yet running).
fn destination(key: PathBuf, log: PathBuf) -> (String, JoinHandle<Result<Vm, vmm::Error>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let key = vmm::migration::wire::read_key(&key).unwrap();
        let overrides = RestoreOverrides {
            serial: Some(SerialConfig::File(log)),
            ..Default::default()
        };
        vmm::migration::receive(conn, &key, None, &overrides)
    });
    (addr, t)
}

fn migrate(vm: &Running, to: &str, key: &Path, downtime_ms: u64) -> Result<String, String> {
    vm.control
        .call(Request::Migrate {
            to: to.into(),
            key_file: key.into(),
            downtime_ms,
            tls: None,
            twin: None,
            keep: None,
            clone: false,
        })
        .map_err(|e| e.to_string())
}

/// What the proxy does to the source's frames.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Flips a byte in the payload (or the MAC, for an empty one) of the first frame of
    /// this kind.
    Flip(u8),
    /// Closes both connections instead of passing on the first frame of this kind.
    Drop(u8),
    /// Passes on the first frame of this kind twice.
    Replay(u8),
    /// Passes on this many bytes per second.
    Slow(u64),
}

/// A proxy between the source and `to` that applies `fault` to what the source sends;
/// returns its address.
fn proxy(to: String, fault: Fault) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut src, _) = listener.accept().unwrap();
        let mut dst = TcpStream::connect(&to).unwrap();
        let (mut src_w, mut dst_r) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut dst_r, &mut src_w);
            let _ = src_w.shutdown(Shutdown::Write);
        });
        let mut hello = [0u8; HELLO_LEN];
        src.read_exact(&mut hello).unwrap();
        dst.write_all(&hello).unwrap();
        let mut done = false;
        loop {
            let mut header = [0u8; HEADER_LEN];
            if src.read_exact(&mut header).is_err() {
                break;
            }
            let len = u32::from_le_bytes(header[16..20].try_into().unwrap());
            let mut rest = vec![0u8; usize::try_from(len).unwrap() + MAC_LEN];
            if src.read_exact(&mut rest).is_err() {
                break;
            }
            let mut frame = header.to_vec();
            frame.extend_from_slice(&rest);
            let mut copies = 1;
            match fault {
                Fault::Flip(k) if header[6] == k && !done => {
                    let at = HEADER_LEN + rest.len() / 2;
                    frame[at] ^= 0x10;
                    done = true;
                }
                Fault::Drop(k) if header[6] == k => {
                    let _ = src.shutdown(Shutdown::Both);
                    let _ = dst.shutdown(Shutdown::Both);
                    break;
                }
                Fault::Replay(k) if header[6] == k && !done => {
                    copies = 2;
                    done = true;
                }
                Fault::Slow(rate) => {
                    let len = u64::try_from(frame.len()).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(len * 1_000_000 / rate));
                }
                _ => {}
            }
            for _ in 0..copies {
                if dst.write_all(&frame).is_err() {
                    break;
                }
            }
        }
        let _ = dst.shutdown(Shutdown::Write);
        let _ = back.join();
    });
    (addr, t)
}

// Frame kinds (see vmm::migration::wire::Kind).
const SETUP: u8 = 1;
const PAGES: u8 = 2;
const STATE: u8 = 3;
const COMMIT: u8 = 5;
const DISK: u8 = 10;

#[test]
fn the_counter_goes_on_at_the_destination() {
    let Some(probe) = probe("the_counter_goes_on_at_the_destination") else {
        return;
    };
    let s = Scratch::new("migrate-ok");
    let (log_a, log_b) = (s.path("a.log"), s.path("b.log"));
    let key = write_key(&s.path("key"), 0x5a);
    let a = counting_vm(&probe, &log_a);
    let (to, dest) = destination(key.clone(), log_b.clone());

    let answer = migrate(&a, &to, &key, 30).expect("the migration failed");
    assert!(
        answer.starts_with("migrated rounds=") && answer.contains("downtime_us="),
        "{answer}"
    );
    let b = Running::start(dest.join().unwrap().expect("the destination refused"));
    // The source ended itself once the destination ran the guest.
    assert_eq!(a.join().unwrap(), RunOutcome::Migrated);
    let stopped_at = last_counter(&log_a);
    let text = wait_for(&log_b, &format!("PROBE counter {}\n", stopped_at + 3));
    assert_eq!(
        text.lines().next(),
        Some(format!("PROBE counter {}", stopped_at + 1).as_str()),
        "the destination did not go on where the source stopped:\n{text}"
    );
    assert!(
        !text.contains("PROBE ready"),
        "the guest booted again:\n{text}"
    );
    let field = |name: &str| -> u64 {
        answer
            .split(' ')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {answer}"))
            .parse()
            .unwrap()
    };
    assert!(field("rounds") >= 1 && field("pages") > 0 && field("bytes") > 4096 * field("pages"));
    eprintln!("migration: {answer}");
    assert_eq!(b.stop().unwrap(), RunOutcome::Stopped);
}

#[test]
fn a_source_the_destination_does_not_admit_is_refused_with_the_reason_and_runs_on() {
    let Some(probe) = probe("a_source_the_destination_does_not_admit_is_refused") else {
        return;
    };
    let s = Scratch::new("migrate-admit");
    let log_a = s.path("a.log");
    let key = write_key(&s.path("key"), 0x5a);
    let a = counting_vm(&probe, &log_a);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let k = vmm::migration::wire::read_key(&key).unwrap();
    let dest = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut shown = None;
        let r = vmm::migration::receive_admitting(conn, &k, None, |cert| {
            shown = Some(cert.map(<[u8]>::to_vec));
            Err(vmm::Error::Migration("this device has no twin here".into()))
        });
        (r.map(|_| ()), shown)
    });
    let e = migrate(&a, &to, &key, 30).expect_err("a source not admitted went through");
    assert!(e.contains("this device has no twin here"), "{e}");
    assert!(e.contains("runs on here"), "{e}");
    let (r, shown) = dest.join().unwrap();
    assert!(r.is_err());
    // Asked once the key checked out; without TLS there is no certificate to show.
    assert_eq!(shown, Some(None));
    let n = last_counter(&log_a);
    wait_for(&log_a, &format!("PROBE counter {}\n", n + 2));
}

/// Starts a migration of `a` through a proxy applying `fault` and checks it is refused and
/// the guest counts on at the source. Returns the source's answer.
fn refused_through(a: &Running, log_a: &Path, key: &Path, dest_key: &Path, fault: Fault) -> String {
    let dir = log_a.parent().unwrap();
    let (to, dest) = destination(dest_key.into(), dir.join("never.log"));
    let (via, proxy) = proxy(to, fault);
    let e = migrate(a, &via, key, 30).expect_err("a faulty migration went through");
    eprintln!("{fault:?}: {e}");
    assert!(e.contains("runs on here"), "{fault:?}: {e}");
    let d = dest.join().unwrap();
    assert!(d.is_err(), "{fault:?}: the destination built a VM");
    proxy.join().unwrap();
    assert!(
        !dir.join("never.log").exists()
            || std::fs::read_to_string(dir.join("never.log"))
                .unwrap()
                .is_empty()
    );
    let n = last_counter(log_a);
    wait_for(log_a, &format!("PROBE counter {}\n", n + 2));
    e
}

#[test]
fn a_damaged_dropped_or_replayed_message_or_another_key_is_refused_and_the_source_runs_on() {
    let Some(probe) = probe("a_damaged_dropped_or_replayed_message_is_refused") else {
        return;
    };
    let s = Scratch::new("migrate-bad");
    let log_a = s.path("a.log");
    let key = write_key(&s.path("key"), 0x5a);
    let other = write_key(&s.path("other"), 0x66);
    let a = counting_vm(&probe, &log_a);

    for fault in [Fault::Flip(SETUP), Fault::Flip(PAGES), Fault::Flip(STATE)] {
        let e = refused_through(&a, &log_a, &key, &key, fault);
        assert!(e.contains("authentication"), "{fault:?}: {e}");
    }
    let e = refused_through(&a, &log_a, &key, &key, Fault::Replay(PAGES));
    assert!(e.contains("replayed"), "{e}");
    // The connection dropped during the rounds and during the stop-and-copy.
    for fault in [Fault::Drop(PAGES), Fault::Drop(STATE)] {
        refused_through(&a, &log_a, &key, &key, fault);
    }
    let e = refused_through(&a, &log_a, &key, &other, Fault::Replay(0));
    assert!(e.contains("authentication"), "{e}");

    // Lost after the commit: in doubt, so the guest stays paused here (and the destination,
    // which never saw the commit, does not run it); `resume` runs it here again.
    let (to, dest) = destination(key.clone(), s.path("b.log"));
    let (via, proxy) = proxy(to, Fault::Drop(COMMIT));
    let e = migrate(&a, &via, &key, 30).expect_err("no commit, yet it went through");
    assert!(e.contains("in doubt"), "{e}");
    assert!(dest.join().unwrap().is_err());
    proxy.join().unwrap();
    let n = last_counter(&log_a);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        last_counter(&log_a),
        n,
        "the source ran on after the commit"
    );
    a.control.call(Request::Resume).unwrap();
    wait_for(&log_a, &format!("PROBE counter {}\n", n + 2));

    // And after all that, a clean migration still works.
    let log_b = s.path("b2.log");
    let (to, dest) = destination(key.clone(), log_b.clone());
    migrate(&a, &to, &key, 30).unwrap();
    let b = Running::start(dest.join().unwrap().unwrap());
    assert_eq!(a.join().unwrap(), RunOutcome::Migrated);
    wait_for(
        &log_b,
        &format!("PROBE counter {}\n", last_counter(&log_a) + 2),
    );
    assert_eq!(b.stop().unwrap(), RunOutcome::Stopped);
}

/// A probe VM in memory-check mode (`args` added) with a serial log at `log`, once it has
/// filled its memory.
fn mem_vm(probe: &Path, log: &Path, args: &str) -> Running {
    let mut cfg = VmConfig::new(probe.to_path_buf());
    cfg.cmdline = format!("pv.mode=mem pv.mem.refill=1 {args}");
    cfg.memory_mib = 64;
    cfg.serial = SerialConfig::File(log.to_path_buf());
    let vm = Running::start(Vm::new(&cfg).unwrap());
    wait_for(log, "PROBE mem pass n=2 ok");
    vm
}

/// The number of the last good `mem pass` in the file at `log`; panics on a bad pass.
fn last_good_pass(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap();
    assert!(!text.contains(" bad "), "a memory check failed:\n{text}");
    text.lines()
        .filter(|l| l.ends_with(" ok") || l.contains(" ok "))
        .filter_map(|l| {
            l.strip_prefix("PROBE mem pass n=")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .next_back()
        .unwrap_or(0)
}

#[test]
fn every_page_a_busy_guest_wrote_arrives() {
    let Some(probe) = probe("every_page_a_busy_guest_wrote_arrives") else {
        return;
    };
    let s = Scratch::new("migrate-mem");
    let (log_a, log_b) = (s.path("a.log"), s.path("b.log"));
    let key = write_key(&s.path("key"), 0x21);
    // 4 MiB rewritten every 50 ms while the migration runs.
    let a = mem_vm(&probe, &log_a, "pv.mem.mb=4 pv.mem.gap=50");
    let (to, dest) = destination(key.clone(), log_b.clone());
    let answer = migrate(&a, &to, &key, 30).expect("the migration failed");
    eprintln!("busy guest: {answer}");
    let b = Running::start(dest.join().unwrap().expect("the destination refused"));
    assert_eq!(a.join().unwrap(), RunOutcome::Migrated);
    let at_source = last_good_pass(&log_a);
    // Two whole passes at the destination: every page it checks came across intact.
    wait_for(&log_b, &format!("PROBE mem pass n={} ok", at_source + 2));
    assert_eq!(last_good_pass(&log_b), at_source + 2);
    assert_eq!(b.stop().unwrap(), RunOutcome::Stopped);
}

#[test]
fn a_guest_dirtying_faster_than_a_slow_link_is_refused_and_runs_on() {
    let Some(probe) = probe("a_guest_dirtying_faster_than_a_slow_link") else {
        return;
    };
    let s = Scratch::new("migrate-busy");
    let log_a = s.path("a.log");
    let key = write_key(&s.path("key"), 0x33);
    // 2 MiB rewritten over and over, through a link of 4 MiB/s.
    let a = mem_vm(&probe, &log_a, "pv.mem.mb=2 pv.mem.gap=0");
    let (to, dest) = destination(key.clone(), s.path("never.log"));
    let (via, proxy) = proxy(to, Fault::Slow(4 << 20));
    let t0 = std::time::Instant::now();
    let e = migrate(&a, &via, &key, 30).expect_err(
        "a guest that never stops writing converged (is guest/out/probe.elf older than \
         pv.mem.refill? guest/build-probe.sh rebuilds it)",
    );
    let took = t0.elapsed();
    eprintln!("refused after {took:?}: {e}");
    assert!(
        e.contains("did not converge")
            && e.contains("runs on here")
            && e.contains("throttled up to 80%"),
        "{e}"
    );
    assert!(
        took < std::time::Duration::from_secs(60),
        "it took {took:?} to give up"
    );
    assert!(dest.join().unwrap().is_err());
    proxy.join().unwrap();
    // The guest goes on at the source, its memory intact.
    let n = last_good_pass(&log_a);
    wait_for(&log_a, &format!("PROBE mem pass n={} ok", n + 2));
    last_good_pass(&log_a);
    assert_eq!(a.stop().unwrap(), RunOutcome::Stopped);
}

/// Bytes of the disks of the disk tests: 4096 slots of 4 KiB for `pv.mode=blk-counter`.
const DISK_BYTES: usize = 16 << 20;

/// What the probe's `blk-counter` writes for counter `n` (guest/probe `blk::pattern`).
fn blk_pattern(n: u64) -> Vec<u8> {
    let tag = format!("pocketvisor-probe-blk:{n}\n");
    tag.bytes().cycle().take(4096).collect()
}

/// The last `PROBE blk-counter <n>` in the file at `log`.
fn last_blk_counter(log: &Path) -> u64 {
    let serial = std::fs::read_to_string(log).unwrap();
    assert!(
        !serial.contains("blk-counter fail"),
        "the probe failed:\n{serial}"
    );
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE blk-counter "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no blk-counter line in\n{serial}"))
}

/// A probe VM writing its disk at `disk` every 20 ms; the disk starts with 4 MiB of data
/// and zeros after.
fn disk_vm(probe: &Path, log: &Path, disk: &Path) -> Running {
    let mut image: Vec<u8> = (0..DISK_BYTES / 4)
        .map(|i| {
            u32::try_from(i)
                .unwrap()
                .wrapping_mul(2_654_435_761)
                .to_le_bytes()[3]
        })
        .collect();
    image.resize(DISK_BYTES, 0);
    std::fs::write(disk, image).unwrap();
    let mut cfg = VmConfig::new(probe.to_path_buf());
    cfg.cmdline = "pv.mode=blk-counter pv.counter.ms=20".into();
    cfg.memory_mib = 64;
    cfg.serial = SerialConfig::File(log.to_path_buf());
    cfg.disks.push(DiskConfig {
        path: disk.to_path_buf(),
        read_only: false,
        encrypted: false,
        key: None,
    });
    let vm = Running::start(Vm::new(&cfg).unwrap());
    wait_for(log, "PROBE blk-counter 3\n");
    vm
}

/// A destination whose disk is `disk` (which must exist, the source's size).
fn disk_destination(
    key: PathBuf,
    log: PathBuf,
    disk: PathBuf,
) -> (String, JoinHandle<Result<Vm, vmm::Error>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let key = vmm::migration::wire::read_key(&key).unwrap();
        let overrides = RestoreOverrides {
            serial: Some(SerialConfig::File(log)),
            disks: vec![disk],
            ..Default::default()
        };
        vmm::migration::receive(conn, &key, None, &overrides)
    });
    (addr, t)
}

/// The file names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

#[test]
fn a_disk_the_guest_writes_arrives_as_it_was_at_the_switch_and_later_writes_land_there() {
    let Some(probe) = probe("a_disk_the_guest_writes_arrives") else {
        return;
    };
    let s = Scratch::new("migrate-disk");
    let (log_a, log_b) = (s.path("a.log"), s.path("b.log"));
    let (disk_a, disk_b) = (s.path("a.img"), s.path("b.img"));
    let key = write_key(&s.path("key"), 0x4d);
    let a = disk_vm(&probe, &log_a, &disk_a);
    std::fs::write(&disk_b, vec![0xeeu8; DISK_BYTES]).unwrap();
    let (to, dest) = disk_destination(key.clone(), log_b.clone(), disk_b.clone());

    let answer = migrate(&a, &to, &key, 30).expect("the migration failed");
    eprintln!("disk migration: {answer}");
    let b = Running::start(dest.join().unwrap().expect("the destination refused"));
    assert_eq!(a.join().unwrap(), RunOutcome::Migrated);
    let chunks: u64 = answer
        .split(' ')
        .find_map(|f| f.strip_prefix("disk_chunks="))
        .expect("no disk_chunks")
        .parse()
        .unwrap();
    // 4 MiB of data and at least the guest's first slots: 64 KiB chunks.
    assert!(chunks > 64, "{answer}");
    let stopped_at = last_blk_counter(&log_a);
    let at_switch = std::fs::read(&disk_a).unwrap();
    let text = wait_for(&log_b, &format!("PROBE blk-counter {}\n", stopped_at + 5));
    assert!(
        !text.contains("PROBE ready"),
        "the guest booted again:\n{text}"
    );
    assert_eq!(b.stop().unwrap(), RunOutcome::Stopped);
    let last_b = last_blk_counter(&log_b);

    // The destination's disk is the source's at the switch with the writes made after it.
    let got = std::fs::read(&disk_b).unwrap();
    let mut expect = at_switch.clone();
    let slot = |n: u64| (usize::try_from(n).unwrap() % (DISK_BYTES / 4096)) * 4096;
    for n in stopped_at + 1..=last_b {
        expect[slot(n)..slot(n) + 4096].copy_from_slice(&blk_pattern(n));
    }
    // A write that completed just before the stop, not yet printed.
    let next = slot(last_b + 1);
    if got[next..next + 4096] == blk_pattern(last_b + 1)[..] {
        expect[next..next + 4096].copy_from_slice(&blk_pattern(last_b + 1));
    }
    if got != expect {
        let first = got.iter().zip(&expect).position(|(x, y)| x != y).unwrap();
        panic!(
            "the destination disk differs from the source's at the switch plus later writes, \
             first at byte {first:#x} (source stopped at {stopped_at}, destination at {last_b})"
        );
    }
    assert_eq!(sha256_hex(&got), sha256_hex(&expect));
    // The source's last writes are in it too: the slot of the last counter it printed.
    assert_eq!(
        got[slot(stopped_at)..slot(stopped_at) + 4096],
        blk_pattern(stopped_at)[..]
    );
    assert!(!names_in(disk_b.parent().unwrap())
        .iter()
        .any(|n| n.contains("migrating")));
}

#[test]
fn a_damaged_disk_frame_is_refused_and_nothing_changes_at_the_destination() {
    let Some(probe) = probe("a_damaged_disk_frame_is_refused") else {
        return;
    };
    let s = Scratch::new("migrate-disk-bad");
    let (log_a, disk_a, disk_b) = (s.path("a.log"), s.path("a.img"), s.path("b.img"));
    let key = write_key(&s.path("key"), 0x4e);
    let a = disk_vm(&probe, &log_a, &disk_a);
    let before_b = vec![0xeeu8; DISK_BYTES];
    std::fs::write(&disk_b, &before_b).unwrap();
    let (to, dest) = disk_destination(key.clone(), s.path("never.log"), disk_b.clone());
    let (via, proxy) = proxy(to, Fault::Flip(DISK));
    let e = migrate(&a, &via, &key, 30).expect_err("a damaged disk frame went through");
    eprintln!("flipped disk frame: {e}");
    assert!(
        e.contains("authentication") && e.contains("runs on here"),
        "{e}"
    );
    assert!(dest.join().unwrap().is_err());
    proxy.join().unwrap();
    // The guest writes on at the source, into its own disk.
    let n = last_blk_counter(&log_a);
    wait_for(&log_a, &format!("PROBE blk-counter {}\n", n + 3));
    assert_eq!(a.stop().unwrap(), RunOutcome::Stopped);
    let last = last_blk_counter(&log_a);
    let got_a = std::fs::read(&disk_a).unwrap();
    let slot = (usize::try_from(last).unwrap() % (DISK_BYTES / 4096)) * 4096;
    assert_eq!(got_a[slot..slot + 4096], blk_pattern(last)[..]);
    // Nothing changed at the destination: its disk, and no temporary file left.
    assert!(
        std::fs::read(&disk_b).unwrap() == before_b,
        "the destination disk changed"
    );
    assert!(
        !names_in(disk_b.parent().unwrap())
            .iter()
            .any(|n| n.contains("migrating")),
        "a temporary disk file was left: {:?}",
        names_in(disk_b.parent().unwrap())
    );
}
