//! Pre-copy live migration of a running VM to another VMM process.
//!
//! The source ([`Request::Migrate`](crate::Request::Migrate)) connects to a destination
//! waiting in [`receive`], over TLS 1.3 with both hosts' certificates when they have them
//! (see [`tls`]), and over one authenticated channel (see [`wire`]):
//!
//! 1. sends the configuration and memory layout (`Setup`); the destination answers with
//!    `Base`, the digests of a copy of this guest it already holds (empty without one: see
//!    [`receive_onto`]); the source turns on dirty logging and sends every non-zero page, or
//!    with a base every page whose digest differs, while the guest runs (round 1); the
//!    destination creates the KVM VM, its RAM and vCPUs meanwhile, so the pause does not
//!    wait for them;
//! 2. sends the pages dirtied during the previous round, round after round, until what is
//!    left would go within the downtime budget at the link speed it measured (each round
//!    ends with `RoundEnd`, which the destination acknowledges once it has every page, so
//!    a round is timed end to end). When the
//!    dirty set does not shrink, it throttles the vCPUs (parks them for a growing share of
//!    each round, up to [`MAX_THROTTLE_PERCENT`]); after [`MAX_ROUNDS`] rounds, or
//!    [`MAX_STALLED_ROUNDS`] at the largest throttle without progress, it gives up,
//!    says so, and the guest runs on at the source;
//! 3. pauses the VM, sends the last dirty pages and the VM's state (the snapshot sections:
//!    vCPUs, VM-wide state, serial port, devices by id);
//! 4. the destination checks everything exactly as a restore does (container checksum,
//!    architecture, configuration equal to the one announced, layout, every section),
//!    completes the VM (devices, irqchip and vCPU state) and answers `Ready`; the source answers `Commit`; the destination answers
//!    `Running` and runs the guest; only then does the source stop.
//!
//! Any failure before the source sends `Commit` (a damaged, replayed or missing frame, a
//! refusal, no convergence) leaves the guest running at the source (it is resumed if the
//! migration paused it) and the destination drops what it built. A connection lost after
//! `Commit` is *in doubt*: the destination may or may not run the guest, so the source keeps
//! it paused (never lost; `resume` runs it here again) and says so.
//!
//! A cloud host ([`accept_request`]) first reads a device's request. For `offload NAME` the
//! device is the source, on that same channel, and the host carries its frames on to a jailed
//! VMM of the twin's ([`Requested::forward`], [`proxy`]; that VMM receives with
//! [`receive_from_proxy`]). For `return NAME` the host answers `Accept`
//! ([`Requested::accept`]) and, on the device's connection, a migration its twin's VMM makes
//! to it over a unix socket (a destination `unix:PATH`, plain: [`LOCAL_PREFIX`]) goes on to
//! the device from a new hello, the twin the source and the device ([`receive_returned`]) the
//! destination: relayed unread under one key ([`relay`]), or proxied frame by frame from a
//! key of the host's and the twin's to the device's ([`proxy`], the cloud host's way).

pub mod checkpoints;
pub mod proxy;
pub mod relay;
pub mod tls;
pub mod wire;

mod base;
mod disk;
pub(crate) mod fault;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use devices::GuestMem;

use crate::config::VmConfig;
use crate::memory::{DirtyRegion, DIRTY_PAGE_SIZE};
use crate::snapshot::memory::{check_layout, layout_of, nonzero_runs, MemRegion, CHUNK};
use crate::snapshot::RestoreOverrides;
use crate::vcpu::VcpuThread;
use crate::vm::Vm;
use crate::Error;
use base::Base;
use disk::{apply_disk, DiskIn};
pub(crate) use disk::{DiskBatch, DiskOut};
pub use fault::kill_point;
pub use proxy::{proxy, Proxied};
pub use relay::{relay, LocalEnd, Relayed};
use tls::Transport;
pub use vmm_api::MigrationTls;
use wire::{Channel, Kind, Role, WireError, KEY_LEN, MAX_PAYLOAD};

/// The downtime budget when none is given.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(30);
/// Rounds of dirty pages before a migration that does not converge gives up.
pub const MAX_ROUNDS: u32 = 30;
/// Rounds at the largest throttle without the dirty set halving before a migration gives up.
pub const MAX_STALLED_ROUNDS: u32 = 3;
/// The largest share of time the vCPUs are parked to let the copy catch up.
pub const MAX_THROTTLE_PERCENT: u32 = 80;
/// How long either side waits for the other before giving up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How to migrate.
#[derive(Clone)]
pub struct MigrateOptions {
    /// The destination, `host:port`.
    pub to: String,
    /// The key both hosts hold.
    pub key: [u8; KEY_LEN],
    /// The longest the guest may stand still for the final copy.
    pub downtime: Duration,
    /// This host's TLS identity and the destination's authority; `None`: plain TCP.
    pub tls: Option<MigrationTls>,
    /// What to ask of a cloud host before anything else (`offload NAME`); `None` for a
    /// plain destination (`pocketvisor receive`).
    pub request: Option<String>,
    /// Where to keep a snapshot of the VM as it is at the switch (written while it is
    /// paused, after the destination's `Ready` and before `Commit`; a failure to write it
    /// is a failure before `Commit`: the guest runs on here). The disks stay where they are.
    pub keep: Option<std::path::PathBuf>,
    /// A clone: the guest runs on here once the destination runs it too (or if the
    /// connection fails after `Commit`: a clone is never in doubt).
    pub clone: bool,
}

/// The longest request a cloud host reads.
pub const MAX_REQUEST_LEN: usize = 256;

/// What a source announces to a cloud host before anything is built (see
/// [`Requested::forward`]).
pub struct Arrival<'a> {
    /// The configuration (validated).
    pub config: &'a VmConfig,
    /// The size in bytes of each of its disks, in the order of `config.disks`.
    pub disk_sizes: &'a [u64],
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationStats {
    /// Rounds of pages sent while the guest ran, stop-and-copy not counted.
    pub rounds: u32,
    /// Bytes the source wrote on the connection.
    pub bytes: u64,
    /// Guest pages sent, all rounds and the stop-and-copy.
    pub pages: u64,
    /// Pages sent in the stop-and-copy.
    pub final_pages: u64,
    /// From the pause at the source to the destination's `Running`.
    pub downtime: Duration,
    /// From the start to the end.
    pub total: Duration,
    /// The highest vCPU throttle used, in percent of the time.
    pub throttle_percent: u32,
    /// Disk chunks sent, all rounds and the stop-and-copy.
    pub disk_chunks: u64,
    /// Time spent writing the kept copy (part of the downtime); zero without one.
    pub kept: Duration,
    /// Bytes of pages and disk chunks not sent because the destination's base had them.
    pub base_skipped: u64,
    /// Bytes of the destination's `Base` payload (its digests; 0 without a base).
    pub base_received: u64,
    /// Where the downtime went.
    pub phases: DowntimePhases,
}

/// The parts of a migration's downtime, in order (they add up to it, less the kept copy).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DowntimePhases {
    /// Parking the vCPUs, quiescing the devices and draining the serial log.
    pub pause: Duration,
    /// Saving the VM state, and the last dirty pages and disk chunks.
    pub copy: Duration,
    /// Encoding, compressing (over a slow link) and sending the VM state.
    pub state: Duration,
    /// Waiting for the destination's `Ready` (it completes and checks the VM).
    pub ready: Duration,
    /// From `Commit` to the destination's `Running`.
    pub commit: Duration,
}

impl std::fmt::Display for MigrationStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "migrated rounds={} bytes={} pages={} final_pages={} downtime_us={} total_ms={} \
             throttle_percent={} disk_chunks={} kept_ms={} base_skipped={} base_received={} \
             pause_us={} copy_us={} state_us={} ready_us={} commit_us={}",
            self.rounds,
            self.bytes,
            self.pages,
            self.final_pages,
            self.downtime.as_micros(),
            self.total.as_millis(),
            self.throttle_percent,
            self.disk_chunks,
            self.kept.as_millis(),
            self.base_skipped,
            self.base_received,
            self.phases.pause.as_micros(),
            self.phases.copy.as_micros(),
            self.phases.state.as_micros(),
            self.phases.ready.as_micros(),
            self.phases.commit.as_micros(),
        )
    }
}

/// The `Setup` frame's payload.
#[derive(Serialize, Deserialize)]
struct Setup {
    config: VmConfig,
    regions: Vec<MemRegion>,
    /// The size in bytes of each disk of `config`, in order.
    disk_sizes: Vec<u64>,
}

fn refused(why: impl std::fmt::Display) -> Error {
    Error::Migration(why.to_string())
}

/// The reason an error gives, without the `migration: ` its display starts with.
fn reason(e: &Error) -> String {
    match e {
        Error::Migration(why) => why.clone(),
        other => other.to_string(),
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        Error::Migration(e.to_string())
    }
}

/// A failure at the source, and whether it happened after `Commit` (in doubt).
struct Failure {
    error: Error,
    in_doubt: bool,
}

impl<E: Into<Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            error: e.into(),
            in_doubt: false,
        }
    }
}

/// Where batches of runs go: a migration's `Pages` and `Disk` frames, or the files of a
/// replica's checkpoint (`crate::replica`), which holds the same runs.
pub(crate) trait RunSink {
    /// Takes a batch of page runs (`addr u64 | length u32 | bytes`, repeated).
    fn pages(&mut self, runs: &[u8]) -> Result<(), Error>;
    /// Takes a batch of disk runs (`disk u32 | offset u64 | length u32 | bytes`, repeated).
    fn disk(&mut self, runs: &[u8]) -> Result<(), Error>;
}

impl<S: Read + Write> RunSink for Channel<S> {
    fn pages(&mut self, runs: &[u8]) -> Result<(), Error> {
        Ok(self.send(Kind::Pages, runs)?)
    }

    fn disk(&mut self, runs: &[u8]) -> Result<(), Error> {
        Ok(self.send(Kind::Disk, runs)?)
    }
}

/// Page runs, gathered into batches (frames) of about [`CHUNK`] bytes.
pub(crate) struct PageBatch {
    payload: Vec<u8>,
    /// Pages taken so far.
    pub(crate) pages: u64,
}

impl PageBatch {
    pub(crate) fn new() -> Self {
        PageBatch {
            payload: Vec::with_capacity(CHUNK + 4096),
            pages: 0,
        }
    }

    /// Adds the run of `bytes` at guest address `addr`; hands the batch to `out` once full.
    pub(crate) fn push(
        &mut self,
        out: &mut impl RunSink,
        addr: u64,
        bytes: &[u8],
    ) -> Result<(), Error> {
        let len = u32::try_from(bytes.len()).map_err(|_| refused("an oversized page run"))?;
        self.payload.extend_from_slice(&addr.to_le_bytes());
        self.payload.extend_from_slice(&len.to_le_bytes());
        self.payload.extend_from_slice(bytes);
        self.pages += (bytes.len() as u64).div_ceil(DIRTY_PAGE_SIZE);
        if self.payload.len() >= CHUNK {
            self.flush(out)?;
        }
        Ok(())
    }

    /// Hands what the batch holds to `out`.
    pub(crate) fn flush(&mut self, out: &mut impl RunSink) -> Result<(), Error> {
        if !self.payload.is_empty() {
            out.pages(&self.payload)?;
            self.payload.clear();
        }
        Ok(())
    }
}

/// Sends the pages `dirty` lists, read from `mem` now, in runs of at most [`CHUNK`] bytes;
/// `between` runs after every batch handed to `out` (the throttle). Returns the pages sent.
pub(crate) fn send_dirty(
    out: &mut impl RunSink,
    mem: &GuestMem,
    dirty: &[DirtyRegion],
    mut between: impl FnMut(),
) -> Result<u64, Error> {
    let mut batch = PageBatch::new();
    let mut buf = vec![0u8; CHUNK];
    for (first, len) in dirty
        .iter()
        .flat_map(|region| region.runs(CHUNK as u64 / DIRTY_PAGE_SIZE))
    {
        let len = usize::try_from(len).map_err(|_| refused("a page run"))?;
        let run = &mut buf[..len];
        mem.read_slice(run, GuestAddress(first))
            .map_err(|e| refused(format!("reading guest memory at {first:#x}: {e}")))?;
        let before = batch.payload.len();
        batch.push(out, first, run)?;
        if batch.payload.len() < before {
            between();
        }
    }
    batch.flush(out)?;
    Ok(batch.pages)
}

/// What the convergence estimate counts for the compressed `State` frame sent in the pause:
/// 2.1 KiB measured for a probe guest with one vCPU (28 KiB uncompressed).
const STATE_ALLOWANCE: u64 = 4 << 10;

/// zstd's level for the `State` frame: its fastest, which still shrinks a state container
/// more than tenfold (mostly zeros and repeated structure).
const STATE_ZSTD_LEVEL: i32 = 1;

/// Bytes of zeros each end compresses or decompresses once, before the pause, so that the
/// pause's own call finds its zstd context's tables made (a state container of 16-128 KiB
/// takes tables of the same size).
const STATE_WARM_UP: usize = 64 << 10;

/// The source's zstd context for the `State` frame, made before the pause: a fresh context
/// cost 100 of the 130 µs compressing a probe guest's 28 KiB state took on this project's
/// 2-core host.
struct StatePacker(zstd::bulk::Compressor<'static>);

impl StatePacker {
    fn new() -> Result<Self, Error> {
        let fail = |e: std::io::Error| refused(format!("making the state compressor: {e}"));
        let mut c = zstd::bulk::Compressor::new(STATE_ZSTD_LEVEL).map_err(fail)?;
        c.compress(&vec![0u8; STATE_WARM_UP]).map_err(fail)?;
        Ok(Self(c))
    }

    fn pack(&mut self, container: &[u8]) -> Result<Vec<u8>, Error> {
        self.0
            .compress(container)
            .map_err(|e| refused(format!("compressing the VM state: {e}")))
    }
}

/// The destination's zstd context for the `State` frame, made (like [`StatePacker`]) before
/// the pause: a fresh one cost 60 of the 70 µs decompressing took.
struct StateUnpacker(zstd::bulk::Decompressor<'static>);

impl StateUnpacker {
    fn new() -> Result<Self, Error> {
        let fail = |e: std::io::Error| refused(format!("making the state decompressor: {e}"));
        let mut d = zstd::bulk::Decompressor::new().map_err(fail)?;
        let zeros =
            zstd::bulk::compress(&vec![0u8; STATE_WARM_UP], STATE_ZSTD_LEVEL).map_err(fail)?;
        d.decompress(&zeros, STATE_WARM_UP).map_err(fail)?;
        Ok(Self(d))
    }

    /// The state container a `State` frame carries: at most [`MAX_PAYLOAD`] bytes, as an
    /// uncompressed frame could be, and exactly the size its zstd frame announces (the frame
    /// is authenticated before this runs).
    fn unpack(&mut self, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let malformed =
            |why: &dyn std::fmt::Display| refused(format!("a malformed state frame: {why}"));
        let size = match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(size)) => size,
            Ok(None) => return Err(malformed(&"it does not say its size")),
            Err(e) => return Err(malformed(&e)),
        };
        let size = usize::try_from(size)
            .ok()
            .filter(|&n| n <= MAX_PAYLOAD as usize)
            .ok_or_else(|| {
                refused(format!(
                    "a state frame that decompresses to more than {MAX_PAYLOAD} bytes"
                ))
            })?;
        let out = self
            .0
            .decompress(payload, size)
            .map_err(|e| malformed(&e))?;
        if out.len() != size {
            return Err(malformed(&format!(
                "{} bytes, not the {size} it says",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// The text of an `Abort` frame.
fn abort_reason(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(&payload[..payload.len().min(1024)]);
    format!("the peer gave up: {text}")
}

/// Receives the next frame, which must be of `kind` (an `Abort` is the peer's reason).
fn expect<S: Read + Write>(ch: &mut Channel<S>, kind: Kind) -> Result<Vec<u8>, Error> {
    let f = ch.recv()?;
    match f.kind {
        k if k == kind => Ok(f.payload),
        Kind::Abort => Err(refused(abort_reason(&f.payload))),
        other => Err(refused(format!(
            "a {other:?} frame arrived where {kind:?} was due"
        ))),
    }
}

/// How long a source waits for the destination's `Base` after its `Setup`: a destination with
/// a base reads and digests all of its kept memory and disks first (a few GiB take seconds to
/// minutes), while the guest runs on at the source. The destination has authenticated by then.
const BASE_WAIT: Duration = Duration::from_secs(600);

/// How long a device waits for the cloud host to accept its request: for a return, the host
/// first asks the twin's VMM to migrate and waits (up to 30 s) for it to connect.
const ACCEPT_WAIT: Duration = Duration::from_secs(60);

/// [`expect`] that may wait up to `wait` for the frame, the connection's own read timeout
/// restored after it.
fn expect_within(
    ch: &mut Channel<Transport>,
    kind: Kind,
    wait: Duration,
) -> Result<Vec<u8>, Error> {
    let usual = ch
        .stream()
        .read_timeout()
        .map_err(|e| refused(format!("the connection's timeout: {e}")))?;
    ch.stream()
        .set_read_timeout(Some(wait))
        .map_err(|e| refused(format!("the connection's timeout: {e}")))?;
    let frame = expect(ch, kind);
    ch.stream()
        .set_read_timeout(usual)
        .map_err(|e| refused(format!("the connection's timeout: {e}")))?;
    frame
}

/// How a destination names a unix socket of a relay on this host, `unix:PATH`.
pub const LOCAL_PREFIX: &str = "unix:";

fn connect(to: &str, tls: Option<&MigrationTls>) -> Result<Transport, Error> {
    if let Some(path) = to.strip_prefix(LOCAL_PREFIX) {
        if tls.is_some() {
            return Err(refused(format!(
                "{to} is a relay on this host: TLS runs over TCP, and the relay carries the \
                 bytes on inside its own"
            )));
        }
        let s = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| refused(format!("cannot connect to {to}: {e}")))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| refused(format!("cannot set up the connection: {e}")))?;
        return Ok(Transport::Local(s));
    }
    let s = TcpStream::connect(to).map_err(|e| refused(format!("cannot connect to {to}: {e}")))?;
    configure(&s)?;
    match tls {
        Some(files) => tls::client(s, to, files),
        None => Ok(Transport::Plain(s)),
    }
}

fn configure(s: &TcpStream) -> Result<(), Error> {
    s.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| s.set_nodelay(true))
        .map_err(|e| refused(format!("cannot set up the connection: {e}")))
}

impl Vm {
    /// Migrates this running VM to `opts.to`. On success the guest runs there and this VM
    /// must stop; on failure it runs on here, except after `Commit` (in doubt: it stays
    /// paused and the error says so).
    pub(crate) fn migrate_out(
        &self,
        threads: &[VcpuThread],
        opts: &MigrateOptions,
    ) -> Result<MigrationStats, Error> {
        let t0 = Instant::now();
        self.vcpu_save.check_snapshot_supported()?;
        // The migration takes the dirty logs: a replica's next checkpoint starts a new chain.
        self.checkpointed.store(false, Ordering::Release);
        let was_paused = self.shared.pause.load(Ordering::Acquire);
        // Nothing has stopped yet: a failure to reach the destination leaves the guest as it is.
        let runs_on = |e: Error| refused(format!("{}; the guest runs on here", reason(&e)));
        let stream = connect(&opts.to, opts.tls.as_ref()).map_err(runs_on)?;
        let mut ch = Channel::handshake(stream, &opts.key, Role::Source).map_err(|e| {
            runs_on(refused(format!(
                "the destination ended the connection at the start ({e}): \
                 it refused this host's certificate or is not a migration destination"
            )))
        })?;
        let result = self.precopy(threads, &mut ch, opts, was_paused, t0);
        let _ = self.dirty.stop();
        match result {
            Ok(stats) if opts.clone => {
                if !was_paused {
                    self.resume(threads);
                }
                Ok(stats)
            }
            Ok(stats) => Ok(stats),
            Err(Failure {
                error,
                in_doubt: true,
            }) if opts.clone => {
                if !was_paused {
                    self.resume(threads);
                }
                Err(refused(format!(
                    "the connection failed after the commit ({}): the clone may or may not \
                     run at the destination; the guest runs on here",
                    reason(&error)
                )))
            }
            Err(Failure {
                error,
                in_doubt: true,
            }) => Err(refused(format!(
                "in doubt: the connection failed after the commit ({}); the guest is paused \
                 here and may run at the destination. Resume it here only if it does not run \
                 there",
                reason(&error)
            ))),
            Err(Failure { error, .. }) => {
                let _ = ch.send(Kind::Abort, reason(&error).as_bytes());
                let _ = ch.flush();
                ch.stream_mut().shutdown(Shutdown::Both);
                if !was_paused {
                    self.resume(threads);
                }
                Err(refused(format!(
                    "{}; the guest runs on here",
                    reason(&error)
                )))
            }
        }
    }

    fn precopy(
        &self,
        threads: &[VcpuThread],
        ch: &mut Channel<Transport>,
        opts: &MigrateOptions,
        was_paused: bool,
        t0: Instant,
    ) -> Result<MigrationStats, Failure> {
        let regions = layout_of(&self.mem);
        let dirty_chunks = self.devices.disk_dirty_chunks();
        if dirty_chunks.len() != self.cfg.disks.len() {
            return Err(refused("the VM's disks are not the ones it was configured with").into());
        }
        let disks = self
            .cfg
            .disks
            .iter()
            .zip(dirty_chunks)
            .map(|(d, dirty)| DiskOut::open(&d.path, dirty))
            .collect::<Result<Vec<_>, _>>()?;
        let setup = Setup {
            config: self.cfg.clone(),
            regions: regions.clone(),
            disk_sizes: disks.iter().map(DiskOut::size).collect(),
        };
        let setup = serde_json::to_vec(&setup).map_err(refused)?;
        if let Some(request) = &opts.request {
            ch.send(Kind::Request, request.as_bytes())?;
        }
        ch.send(Kind::Setup, &setup)?;
        ch.flush()?;
        let chunks: Vec<u64> = disks.iter().map(DiskOut::chunk_count).collect();
        let base_payload = expect_within(ch, Kind::Base, BASE_WAIT)?;
        let base = Base::from_bytes(&base_payload, base::page_count(&regions), &chunks)?;

        // Round 1: every non-zero page (with a base: every page that differs from it), with
        // the log on so later writes are seen.
        self.dirty.start()?;
        let round_start = Instant::now();
        let sent_before = ch.bytes_sent;
        let mut disk_batch = DiskBatch::new();
        disk_batch.send_all(ch, &disks, base.as_ref().map(|b| &b.disks[..]))?;
        fault::kill_point("migrate-disk");
        let mut batch = PageBatch::new();
        let mut pages_skipped = 0u64;
        match &base {
            None => {
                nonzero_runs(&self.mem, None, |r, offset, bytes| {
                    batch.push(ch, r.guest_addr + offset, bytes)
                })?;
            }
            Some(b) => {
                let mut theirs = b.memory.iter();
                base::for_each_page(&self.mem, &regions, |addr, page| {
                    // The base was checked to have one digest per page.
                    if theirs.next() == Some(&base::digest(page)) {
                        pages_skipped += page.len() as u64;
                        Ok(())
                    } else {
                        batch.push(ch, addr, page)
                    }
                })?;
            }
        }
        batch.flush(ch)?;
        end_round(ch)?;
        fault::kill_point("migrate-round");
        let mut pages = batch.pages;
        // With a base, round 1's time is mostly this host's digest of every page, not the
        // link's: a return of a guest that changed a little more than one timing round would
        // otherwise see the link at ~0 MiB/s and never fit even 0 KiB in the budget.
        let mut rate = match &base {
            Some(_) => None,
            None => link_rate(ch.bytes_sent - sent_before, round_start.elapsed()),
        };
        let mut rounds = 1u32;
        let mut throttle = 0u32;
        let mut max_throttle = 0u32;
        let mut last_dirty = u64::MAX;
        let mut stalled = 0u32;
        // The pages dirtied since they were last sent, once small enough to go in the pause.
        let pending = loop {
            let dirty = self.dirty.dirty_pages()?;
            let dirty_bytes: u64 = dirty.iter().map(DirtyRegion::count).sum::<u64>()
                * DIRTY_PAGE_SIZE
                + DiskBatch::pending(&disks);
            // The pause also carries the compressed state container.
            let needs = match rate {
                Some(rate) => {
                    Duration::from_secs_f64((dirty_bytes + STATE_ALLOWANCE) as f64 / rate)
                }
                // No round so far was large enough to time the link (a return whose base
                // held nearly everything, an idle guest): a remainder no larger than such a
                // round goes in the pause; a larger one is sent, and that round times it.
                None if dirty_bytes + STATE_ALLOWANCE <= RATE_SAMPLE => Duration::ZERO,
                None => Duration::MAX,
            };
            if needs <= opts.downtime {
                break dirty;
            }
            // Throttled all it may be and still not shrinking: more rounds will not help.
            if throttle == MAX_THROTTLE_PERCENT && dirty_bytes * 2 >= last_dirty {
                stalled += 1;
            }
            if rounds >= MAX_ROUNDS || stalled >= MAX_STALLED_ROUNDS {
                return Err(refused(format!(
                    "did not converge: after {rounds} rounds (vCPUs throttled up to {max_throttle}%) \
                     {} KiB were still dirty, {} ms at {} MiB/s, over the {} ms downtime budget",
                    dirty_bytes >> 10,
                    needs.as_millis(),
                    rate.map_or(0.0, |r| (r / f64::from(1 << 20)).round()),
                    opts.downtime.as_millis()
                ))
                .into());
            }
            // Dirtying at least half as fast as the link drains: slow the guest down.
            if !was_paused && dirty_bytes * 2 >= last_dirty {
                throttle = (throttle + 20).min(MAX_THROTTLE_PERCENT);
                max_throttle = max_throttle.max(throttle);
            }
            last_dirty = dirty_bytes;
            let round_start = Instant::now();
            let sent_before = ch.bytes_sent;
            let mut frame_start = Instant::now();
            let mut parked = Duration::ZERO;
            disk_batch.send_dirty(ch, &disks)?;
            pages += send_dirty(ch, &self.mem, &dirty, || {
                if throttle > 0 {
                    let park = frame_start.elapsed() * throttle / (100 - throttle);
                    let t = Instant::now();
                    if self.pause(threads).is_ok() {
                        std::thread::sleep(park);
                        self.resume(threads);
                    }
                    parked += t.elapsed();
                }
                frame_start = Instant::now();
            })?;
            end_round(ch)?;
            // The link's speed, not counting the time spent holding the vCPUs.
            let sending = round_start.elapsed().saturating_sub(parked);
            if let Some(sample) = link_rate(ch.bytes_sent - sent_before, sending) {
                rate = Some(rate.map_or(sample, |old| sample.max(old / 2.0)));
            }
            rounds += 1;
        };

        // Stop and copy, with the state's compressor made beforehand.
        let mut packer = StatePacker::new()?;
        let paused_at = Instant::now();
        let mut lap = Lap(paused_at);
        let mut phases = DowntimePhases::default();
        self.pause(threads)
            .map_err(|e| refused(format!("cannot pause the VM: {e}")))?;
        phases.pause = lap.next();
        // The last pages and disk chunks, after the VM-wide state (which may write guest RAM).
        let (final_pages, state) = self.state_sections_with_copy(threads, || {
            let last = merge(pending, self.dirty.dirty_pages()?);
            // Paused devices: no write is in flight, every one is marked.
            disk_batch.send_dirty(ch, &disks)?;
            send_dirty(ch, &self.mem, &last, || {})
        })?;
        phases.copy = lap.next();
        fault::kill_point("migrate-stop-copy");
        let state = packer.pack(&state.finish())?;
        ch.send(Kind::State, &state)?;
        ch.flush()?;
        phases.state = lap.next();
        expect(ch, Kind::Ready)?;
        phases.ready = lap.next();
        // The copy this host keeps: the state just sent, with memory as the destination has it.
        let kept_at = Instant::now();
        if let Some(dir) = &opts.keep {
            self.save_snapshot(threads, dir)
                .map_err(|e| refused(format!("cannot keep a copy in {}: {e}", dir.display())))?;
        }
        let kept = if opts.keep.is_some() {
            kept_at.elapsed()
        } else {
            Duration::ZERO
        };
        lap.next();
        ch.send(Kind::Commit, &[])?;
        ch.flush()?;
        fault::kill_point("migrate-committed");
        expect(ch, Kind::Running).map_err(|error| Failure {
            error,
            in_doubt: true,
        })?;
        phases.commit = lap.next();
        Ok(MigrationStats {
            rounds,
            bytes: ch.bytes_sent,
            pages: pages + final_pages,
            final_pages,
            downtime: paused_at.elapsed(),
            total: t0.elapsed(),
            throttle_percent: max_throttle,
            disk_chunks: disk_batch.chunks,
            kept,
            base_skipped: pages_skipped + disk_batch.skipped,
            base_received: base_payload.len() as u64,
            phases,
        })
    }
}

/// Times consecutive phases.
struct Lap(Instant);

impl Lap {
    /// The time since the last call (or the start), and starts the next phase.
    fn next(&mut self) -> Duration {
        let now = Instant::now();
        now - std::mem::replace(&mut self.0, now)
    }
}

/// Ends a round and waits until the destination has every page of it, so the round's time
/// is the link's, not the time to fill socket buffers.
fn end_round<S: Read + Write>(ch: &mut Channel<S>) -> Result<(), Error> {
    ch.send(Kind::RoundEnd, &[])?;
    ch.flush()?;
    expect(ch, Kind::RoundAck).map(drop)
}

/// The pages dirty in `a` or in `b` (two reads of the same memory's log).
fn merge(mut a: Vec<DirtyRegion>, b: Vec<DirtyRegion>) -> Vec<DirtyRegion> {
    for (ra, rb) in a.iter_mut().zip(b) {
        if ra.bitmap.len() < rb.bitmap.len() {
            ra.bitmap.resize(rb.bitmap.len(), 0);
        }
        ra.bitmap
            .iter_mut()
            .zip(rb.bitmap)
            .for_each(|(x, y)| *x |= y);
    }
    a
}

/// Bytes a round must send to time the link by: a smaller round's time is mostly the round
/// trip and the work around the bytes (a return's first round digests every page), and would
/// promise a link far slower than it is.
const RATE_SAMPLE: u64 = 64 << 10;

/// The link's speed in bytes per second, as a round that sent `bytes` in `took` shows it;
/// None for a round too small to tell ([`RATE_SAMPLE`]).
fn link_rate(bytes: u64, took: Duration) -> Option<f64> {
    // A floor keeps an instant round from promising an infinite link.
    (bytes >= RATE_SAMPLE).then(|| bytes as f64 / took.as_secs_f64().max(1e-4))
}

/// Writes a `Pages` payload's runs into `mem`, each checked against `regions`.
fn apply_pages(mem: &GuestMem, regions: &[MemRegion], payload: &[u8]) -> Result<u64, Error> {
    let mut rest = payload;
    let mut pages = 0;
    while !rest.is_empty() {
        let (head, tail) = rest
            .split_at_checked(12)
            .ok_or_else(|| refused("a page run's header is cut short"))?;
        let addr = u64::from_le_bytes(head[..8].try_into().map_err(refused)?);
        let len = u32::from_le_bytes(head[8..].try_into().map_err(refused)?);
        let n = usize::try_from(len)
            .ok()
            .filter(|&n| n > 0 && n <= CHUNK)
            .ok_or_else(|| refused(format!("a page run of {len} bytes")))?;
        if !regions.iter().any(|r| r.holds(addr, u64::from(len))) {
            return Err(refused(format!(
                "a page run at {addr:#x}+{len:#x} outside guest RAM"
            )));
        }
        let (bytes, tail) = tail
            .split_at_checked(n)
            .ok_or_else(|| refused("a page run is cut short"))?;
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| refused(format!("a page run at {addr:#x}: {e}")))?;
        pages += u64::from(len).div_ceil(DIRTY_PAGE_SIZE);
        rest = tail;
    }
    Ok(pages)
}

/// Waits on `stream` for a VM a source migrates here (see the [module](self) docs), checks
/// everything it sends, builds the VM and returns it once the source has committed: run it
/// at once. With `tls`, the source must first pass the TLS handshake with a certificate
/// from `tls.ca`. `overrides` set host-side paths as for a restore. On any error nothing
/// runs here and the source keeps the guest.
pub fn receive(
    stream: TcpStream,
    key: &[u8; KEY_LEN],
    tls: Option<&MigrationTls>,
    overrides: &RestoreOverrides,
) -> Result<Vm, Error> {
    receive_onto(stream, key, tls, overrides, None)
}

/// [`receive`], starting from `base` when given: a snapshot directory this host kept of the
/// same guest (`migrate --keep`), with the disks at the destination's disk paths as they were
/// then. The source is told the digest of every page and disk chunk of that copy and sends
/// only those that differ (a return from the cloud host).
pub fn receive_onto(
    stream: TcpStream,
    key: &[u8; KEY_LEN],
    tls: Option<&MigrationTls>,
    overrides: &RestoreOverrides,
    base: Option<&std::path::Path>,
) -> Result<Vm, Error> {
    configure(&stream)?;
    let stream = match tls {
        Some(files) => tls::server(stream, files)?,
        None => Transport::Plain(stream),
    };
    let mut ch = Channel::handshake(stream, key, Role::Destination)?;
    let result = receive_on(&mut ch, base, |_| Ok(overrides.clone()));
    refuse_on_error(&mut ch, &result);
    result
}

/// [`receive`], with the host-side settings decided by `admit` once the source is
/// authenticated (TLS and the key), from the certificate it showed (None without TLS): the
/// cloud host puts a device's twin in that device's directory, or refuses the device (an
/// error from `admit` goes to the source as the reason, and nothing runs here).
pub fn receive_admitting(
    stream: TcpStream,
    key: &[u8; KEY_LEN],
    tls: Option<&MigrationTls>,
    admit: impl FnOnce(Option<&[u8]>) -> Result<RestoreOverrides, Error>,
) -> Result<Vm, Error> {
    configure(&stream)?;
    let stream = match tls {
        Some(files) => tls::server(stream, files)?,
        None => Transport::Plain(stream),
    };
    let mut ch = Channel::handshake(stream, key, Role::Destination)?;
    let result = admit(ch.stream().peer_certificate())
        .and_then(|overrides| receive_on(&mut ch, None, |_| Ok(overrides)));
    refuse_on_error(&mut ch, &result);
    result
}

/// A cloud host's connection from a device, after TLS (required), the key's handshake and
/// the device's first frame, a request (`offload NAME`, `return NAME`): the host decides
/// from the certificate and the request what to do with it, and either refuses (the device
/// is told why) or goes on with [`Requested::forward`] or [`Requested::accept`].
pub struct Requested {
    ch: Channel<Transport>,
    request: String,
    certificate: Vec<u8>,
}

/// Reads a device's request on `stream` (see [`Requested`]). A connection that fails TLS or
/// the handshake, shows no certificate or sends anything but a well-formed request is
/// refused here, the device told why where the connection allows.
pub fn accept_request(
    stream: TcpStream,
    key: &[u8; KEY_LEN],
    tls: &MigrationTls,
) -> Result<Requested, Error> {
    configure(&stream)?;
    let stream = tls::server(stream, tls)?;
    let mut ch = Channel::handshake(stream, key, Role::Destination)?;
    let result = read_request(&mut ch).and_then(|request| {
        let certificate = ch
            .stream()
            .peer_certificate()
            .ok_or_else(|| refused("the device showed no certificate"))?;
        Ok((request, certificate.to_vec()))
    });
    refuse_on_error(&mut ch, &result);
    let (request, certificate) = result?;
    Ok(Requested {
        ch,
        request,
        certificate,
    })
}

impl Requested {
    /// The authenticated channel to the device, for a request whose frames are not a
    /// migration's (a replica's `replicate` and `recover`: see [`checkpoints`]).
    pub fn channel(&mut self) -> &mut Channel<Transport> {
        &mut self.ch
    }

    /// The request, checked to be short printable UTF-8.
    pub fn request(&self) -> &str {
        &self.request
    }

    /// The end-entity certificate (DER) the device showed.
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    /// Tells the device why it is refused, and ends the connection.
    pub fn refuse(mut self, why: &Error) {
        refuse_on_error::<()>(&mut self.ch, &Err(refused(reason(why))));
    }

    /// An offload carried on to a VMM of its own ([`proxy`]): reads the device's `Setup`,
    /// checks it as a receive does before anything is built, and hands what it announces to
    /// `admit`, which decides the host-side settings, starts the destination (the twin's
    /// jailed VMM) and returns the channel to it after its handshake. The destination then
    /// gets every frame and checks it as any receive does. A refusal or failure goes to the
    /// device as the reason (its guest runs on there); `Ok` once the destination answered
    /// `Running`: the guest runs there.
    pub fn forward(
        mut self,
        admit: impl FnOnce(&Arrival) -> Result<Channel<Transport>, Error>,
    ) -> Result<Proxied, Error> {
        let result = read_setup(&mut self.ch).and_then(|(payload, setup)| {
            let mut destination = admit(&Arrival {
                config: &setup.config,
                disk_sizes: &setup.disk_sizes,
            })?;
            proxy(&mut self.ch, &mut destination, Some(payload), None)
        });
        refuse_on_error(&mut self.ch, &result);
        result
    }

    /// Accepts a return or a view: tells the device so and hands back the connection, on
    /// which a migration from the twin follows, from a new hello, or the twin's screen
    /// ([`relay`] carries either). The device waits for this answer before it goes on.
    pub fn accept(mut self) -> Result<Transport, Error> {
        self.ch.send(Kind::Accept, &[])?;
        self.ch.flush()?;
        Ok(self.ch.into_stream())
    }
}

/// What a return brought back to the device, besides the VM.
pub struct Returned {
    /// The guest, built and committed: run it at once.
    pub vm: Vm,
    /// Bytes that came from the twin on the migration (hello and frames, before TLS).
    pub bytes_received: u64,
    /// Bytes this end sent on it (its hello, the base's digests and its answers).
    pub bytes_sent: u64,
}

/// The device's side of a return: connects to the cloud host `to` over TLS, asks for
/// `request` (`return NAME`) and, once the host accepts, receives the twin's migration as
/// [`receive_onto`] does (from `base` when given), relayed by the host. Without `tls`, `to`
/// is `unix:PATH`, a relay on this host that carries the bytes on inside its own TLS (a
/// jailed VMM's return, relayed by the handset daemon). On any error nothing runs here and
/// the twin runs on at the host.
pub fn receive_returned(
    to: &str,
    key: &[u8; KEY_LEN],
    tls: Option<&MigrationTls>,
    request: &str,
    overrides: &RestoreOverrides,
    base: Option<&std::path::Path>,
) -> Result<Returned, Error> {
    if tls.is_none() && !to.starts_with(LOCAL_PREFIX) {
        return Err(refused(format!(
            "a return from {to} needs TLS: only a relay on this host ({LOCAL_PREFIX}PATH) \
             goes without"
        )));
    }
    let mut ch = open(to, key, tls, request)?;
    expect_accept(&mut ch)?;
    let stream = ch.into_stream();
    let mut ch = Channel::handshake(stream, key, Role::Destination)?;
    let result = receive_on(&mut ch, base, |_| Ok(overrides.clone()));
    refuse_on_error(&mut ch, &result);
    Ok(Returned {
        vm: result?,
        bytes_received: ch.bytes_received,
        bytes_sent: ch.bytes_sent,
    })
}

/// The device's side of a request to the cloud host `to` (`return NAME`, `view NAME`):
/// connects over TLS with the device's certificate, says `request` and waits for the host's
/// `Accept` (a refusal is an error with the host's reason); returns the connection, on which
/// what was asked for follows.
pub fn ask(
    to: &str,
    key: &[u8; KEY_LEN],
    tls: &MigrationTls,
    request: &str,
) -> Result<Transport, Error> {
    let mut ch = open_request(to, key, tls, request)?;
    expect_accept(&mut ch)?;
    Ok(ch.into_stream())
}

/// [`ask`] on the same channel: connects to the cloud host `to` over TLS with this device's
/// certificate, sends `request` and returns the channel, on which the host's answer comes
/// next (see [`expect_accept`]); a replica's `replicate` and `recover` go on on it.
pub fn open_request(
    to: &str,
    key: &[u8; KEY_LEN],
    tls: &MigrationTls,
    request: &str,
) -> Result<Channel<Transport>, Error> {
    open(to, key, Some(tls), request)
}

/// [`open_request`], over TLS or (without `tls`) to a relay on this host (`unix:PATH`).
fn open(
    to: &str,
    key: &[u8; KEY_LEN],
    tls: Option<&MigrationTls>,
    request: &str,
) -> Result<Channel<Transport>, Error> {
    let stream = connect(to, tls)?;
    // The device opens the connection: its first handshake is the requesting end's.
    let mut ch = Channel::handshake(stream, key, Role::Source)?;
    ch.send(Kind::Request, request.as_bytes())?;
    ch.flush()?;
    Ok(ch)
}

/// Waits (up to a minute) for the host's `Accept` on `ch` and returns its payload; its
/// `Abort` is an error with the host's reason.
pub fn expect_accept(ch: &mut Channel<Transport>) -> Result<Vec<u8>, Error> {
    expect_within(ch, Kind::Accept, ACCEPT_WAIT)
}

/// The source's request frame, checked: UTF-8, short, printable.
fn read_request(ch: &mut Channel<Transport>) -> Result<String, Error> {
    let payload = expect(ch, Kind::Request)?;
    if payload.len() > MAX_REQUEST_LEN {
        return Err(refused(format!(
            "a request of {} bytes (at most {MAX_REQUEST_LEN})",
            payload.len()
        )));
    }
    let text = String::from_utf8(payload).map_err(|_| refused("a request that is not UTF-8"))?;
    if text.chars().any(char::is_control) {
        return Err(refused("a request with control characters"));
    }
    Ok(text)
}

/// On a failed receive, tells the source why and drains the connection.
fn refuse_on_error<T>(ch: &mut Channel<Transport>, result: &Result<T, Error>) {
    if let Err(e) = result {
        let _ = ch.send(Kind::Abort, reason(e).as_bytes());
        let _ = ch.flush();
        // Read on until the source stops sending: closing with unread data would reset the
        // connection and lose the reason on the way.
        ch.stream_mut().shutdown(Shutdown::Write);
        let _ = std::io::copy(ch.stream_mut(), &mut std::io::sink());
    }
}

/// The threads a restored VM of `cfg` starts: its vCPUs, the serial log and a worker per
/// device (at most; see [`devices::threads::start_standby`]).
fn threads_needed(cfg: &VmConfig) -> usize {
    usize::from(cfg.vcpus)
        + 1
        + cfg.disks.len()
        + cfg.net.len()
        + usize::from(cfg.vsock.is_some())
        + usize::from(cfg.rng)
        + usize::from(cfg.balloon)
        + usize::from(cfg.gpu.is_some())
        + 2 * usize::from(cfg.input)
}

/// Reads the source's `Setup` and checks it as [`receive_on`] does before it builds
/// anything: its payload as it came and what it says.
fn read_setup(ch: &mut Channel<Transport>) -> Result<(Vec<u8>, Setup), Error> {
    let payload = expect(ch, Kind::Setup)?;
    let setup: Setup =
        serde_json::from_slice(&payload).map_err(|e| refused(format!("a malformed setup: {e}")))?;
    check_setup(&setup)?;
    Ok((payload, setup))
}

/// The checks of a `Setup` that need nothing built: the configuration, the memory layout,
/// a size for each disk.
fn check_setup(setup: &Setup) -> Result<(), Error> {
    setup
        .config
        .validate()
        .map_err(|e| Error::Config(e.to_string()))?;
    check_layout(&setup.regions, &setup.config)?;
    if setup.disk_sizes.len() != setup.config.disks.len() {
        return Err(refused(format!(
            "{} disk sizes announced for {} disks",
            setup.disk_sizes.len(),
            setup.config.disks.len()
        )));
    }
    Ok(())
}

/// A jailed VMM's receive: connects to the migration's proxy on this host (`from`,
/// `unix:PATH`; the cloud host, which carries a device's offload on to it), under `key`, and
/// receives the VM there as [`receive`] does, with `overrides` for its host-side paths. On
/// any error nothing runs and the proxy is told why.
pub fn receive_from_proxy(
    from: &str,
    key: &[u8; KEY_LEN],
    overrides: &RestoreOverrides,
) -> Result<Vm, Error> {
    if !from.starts_with(LOCAL_PREFIX) {
        return Err(refused(format!(
            "{from}: a proxy on this host is reached as {LOCAL_PREFIX}PATH"
        )));
    }
    let stream = connect(from, None)?;
    let mut ch = Channel::handshake(stream, key, Role::Destination)?;
    let result = receive_on(&mut ch, None, |_| Ok(overrides.clone()));
    refuse_on_error(&mut ch, &result);
    result
}

/// Receives a VM on `ch`, with the host-side settings `prepare` gives for the setup the
/// source announced (checked before `prepare` sees it), starting from `base` if given.
fn receive_on(
    ch: &mut Channel<Transport>,
    base: Option<&std::path::Path>,
    prepare: impl FnOnce(&Setup) -> Result<RestoreOverrides, Error>,
) -> Result<Vm, Error> {
    let (_, setup) = read_setup(ch)?;
    let mem = match base {
        Some(dir) => crate::snapshot::base_memory(dir, &setup.regions, &setup.config)?,
        None => {
            let ranges = arch::layout::ram_regions(setup.config.memory_mib << 20);
            GuestMem::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))?
        }
    };
    let overrides = &prepare(&setup)?;
    // The threads the VM will need (its vCPUs, the serial log, a worker per device), started
    // now and woken at the switch: created then, on a busy host, they would start late.
    let standby = devices::threads::start_standby(threads_needed(&setup.config))
        .map_err(|e| refused(format!("cannot start the VM's threads: {e}")))?;
    // Each disk's path here (given, or the one the configuration names), and a temporary
    // file beside it that receives the source's disk; dropped (removed) on any failure.
    let mut disks = setup
        .config
        .disks
        .iter()
        .zip(&setup.disk_sizes)
        .enumerate()
        .map(|(i, (d, &size))| DiskIn::create(overrides.disks.get(i).unwrap_or(&d.path), size))
        .collect::<Result<Vec<_>, _>>()?;
    // What this host starts from, told to the source: round 1 sends only what differs.
    let answer = match base {
        Some(_) => Base {
            memory: base::of_memory(&mem, &setup.regions)?,
            disks: disks
                .iter_mut()
                .map(DiskIn::start_from_base)
                .collect::<Result<Vec<_>, _>>()?,
        }
        .to_bytes()?,
        None => Vec::new(),
    };
    if answer.len() > MAX_PAYLOAD as usize {
        return Err(refused(format!(
            "the base's digests take {} bytes, more than one frame carries ({}); receive \
             without a base",
            answer.len(),
            MAX_PAYLOAD
        )));
    }
    ch.send(Kind::Base, &answer)?;
    ch.flush()?;
    // The VM opens the temporary files; the rename at the commit keeps the same inodes.
    let mut at_temp = overrides.clone();
    at_temp.disks = disks.iter().map(|d| d.temp_path().to_path_buf()).collect();
    // Built now, while the pages arrive, so the guest's pause does not wait for KVM.
    let prepared = Vm::prepare_migrated(mem, &setup.regions, &setup.config, &at_temp)?;
    let mut unpacker = StateUnpacker::new()?;
    let mem = prepared.mem();
    let state = loop {
        let f = ch.recv()?;
        match f.kind {
            Kind::Pages => {
                apply_pages(mem, &setup.regions, &f.payload)?;
            }
            Kind::Disk => {
                apply_disk(&disks, &f.payload)?;
                fault::kill_point("receive-disk");
            }
            Kind::RoundEnd => {
                ch.send(Kind::RoundAck, &[])?;
                ch.flush()?;
                fault::kill_point("receive-round");
            }
            Kind::State => break unpacker.unpack(&f.payload)?,
            Kind::Abort => return Err(refused(abort_reason(&f.payload))),
            other => return Err(refused(format!("an unexpected {other:?} frame"))),
        }
    };
    // What arrived is the starting point, not a change since.
    for r in vm_memory::GuestMemoryBackend::iter(mem) {
        vm_memory::MmapRegion::bitmap(r).reset();
    }
    fault::kill_point("receive-state");
    for d in &disks {
        d.sync()?;
    }
    let mut vm = Vm::restore_prepared(prepared, &state, &setup.regions, &setup.config)?;
    vm.start_vcpus_parked()?;
    drop(standby);
    ch.send(Kind::Ready, &[])?;
    ch.flush()?;
    expect(ch, Kind::Commit)?;
    fault::kill_point("receive-committed");
    for (d, cfg) in disks.iter_mut().zip(&mut vm.cfg.disks) {
        d.commit()?;
        cfg.path = d.path().to_path_buf();
    }
    // The source is committed: the guest runs here even if this answer is lost.
    let _ = ch.send(Kind::Running, &[]).and_then(|()| ch.flush());
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<MemRegion> {
        vec![MemRegion {
            guest_addr: 0,
            size: 1 << 20,
            file_offset: 0,
        }]
    }

    fn run(addr: u64, bytes: &[u8]) -> Vec<u8> {
        let mut v = addr.to_le_bytes().to_vec();
        v.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_le_bytes());
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn a_unix_destination_is_plain_and_reached_as_a_socket() {
        let files = MigrationTls {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            ca: "ca.pem".into(),
        };
        let err = connect("unix:/nonexistent/relay.sock", Some(&files))
            .err()
            .unwrap();
        assert!(err.to_string().contains("relay on this host"), "{err}");
        let err = connect("unix:/nonexistent/relay.sock", None).err().unwrap();
        assert!(err.to_string().contains("cannot connect to unix:"), "{err}");
        let dir = std::env::temp_dir().join(format!("pv-mig-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut t = connect(&format!("unix:{}", path.display()), None).unwrap();
        assert!(matches!(t, Transport::Local(_)));
        t.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        l.accept().unwrap().0.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_source_waits_for_a_slow_base_past_its_usual_timeout_and_keeps_that_timeout() {
        let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
        let usual = Some(Duration::from_millis(300));
        x.set_read_timeout(usual).unwrap();
        let key = [7u8; 32];
        let dst = std::thread::spawn(move || {
            let mut ch = Channel::handshake(y, &key, Role::Destination).unwrap();
            // Digesting a large kept copy: longer than the source's usual read timeout.
            std::thread::sleep(Duration::from_millis(900));
            ch.send(Kind::Base, b"").unwrap();
            ch.flush().unwrap();
            std::thread::sleep(Duration::from_millis(900));
            ch.send(Kind::Base, b"").unwrap();
            ch.flush().unwrap();
        });
        let mut ch = Channel::handshake(Transport::Local(x), &key, Role::Source).unwrap();
        let got = expect_within(&mut ch, Kind::Base, Duration::from_secs(30));
        assert_eq!(got.unwrap(), b"");
        assert_eq!(ch.stream().read_timeout().unwrap(), usual);
        // Past the base, the usual timeout holds again: the second slow frame is not waited for.
        assert!(expect(&mut ch, Kind::Base).is_err());
        dst.join().unwrap();
    }

    #[test]
    fn only_a_round_large_enough_times_the_link() {
        let ms = Duration::from_millis;
        // A return's first round that found nearly everything in the base: its time is the
        // digests', not the link's.
        assert_eq!(link_rate(20 << 10, ms(500)), None);
        assert_eq!(link_rate(0, ms(1)), None);
        assert_eq!(link_rate(1 << 20, ms(1000)), Some(f64::from(1 << 20)));
        // An instant round does not promise an infinite link.
        assert!(link_rate(1 << 20, Duration::ZERO).unwrap().is_finite());
    }

    #[test]
    fn a_state_frame_is_compressed_and_a_bad_one_refused() {
        let state: Vec<u8> = (0..30_000u32).map(|i| (i % 7) as u8).collect();
        let mut packer = StatePacker::new().unwrap();
        let mut unpacker = StateUnpacker::new().unwrap();
        let sent = packer.pack(&state).unwrap();
        assert!(sent.len() * 10 < state.len(), "{} bytes", sent.len());
        assert_eq!(unpacker.unpack(&sent).unwrap(), state);
        // The contexts serve again (a second state through the same ends).
        assert_eq!(
            unpacker.unpack(&packer.pack(&state).unwrap()).unwrap(),
            state
        );
        assert!(unpacker.unpack(b"not zstd at all").is_err());
        assert!(unpacker.unpack(&sent[..sent.len() / 2]).is_err());
        // A frame that does not say what it decompresses to is not taken on trust.
        let unsized_frame = zstd::stream::encode_all(&state[..], STATE_ZSTD_LEVEL).unwrap();
        let err = unpacker.unpack(&unsized_frame).unwrap_err().to_string();
        assert!(err.contains("does not say its size"), "{err}");
    }

    #[test]
    fn page_runs_land_where_they_say_and_nowhere_else() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut p = run(0x2000, &[9; 4096]);
        p.extend(run(0x5000, &[3; 10]));
        assert_eq!(apply_pages(&mem, &regions(), &p).unwrap(), 2);
        let mut b = [0u8; 2];
        mem.read_slice(&mut b, GuestAddress(0x2ffe)).unwrap();
        assert_eq!(b, [9, 9]);
        for bad in [
            run(0xf_f000, &[1; 8192]),          // past the end of RAM
            run(u64::MAX - 10, &[1; 16]),       // wraps
            run(0, &[]),                        // empty
            run(0x1000, &[1; 16])[..20].into(), // cut short
            vec![1, 2, 3],                      // a header cut short
        ] {
            assert!(apply_pages(&mem, &regions(), &bad).is_err());
        }
    }
}
