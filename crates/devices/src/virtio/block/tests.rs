// Test data: hand-built guest-side values and small constants, narrowed on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::chain::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::worker::testing::*;
use crate::virtio::worker::{prepare_queues, VIRTIO_RING_F_INDIRECT_DESC};

const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;

/// A temporary disk image removed on drop.
struct TempDisk(PathBuf);

impl TempDisk {
    fn new(len: usize) -> TempDisk {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "pv-blk-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
        std::fs::write(&path, data).unwrap();
        TempDisk(path)
    }
    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A block worker driven synchronously by the test.
struct Harness {
    mem: GuestMem,
    tq: TestQueue,
    irq: Arc<FakeInterrupt>,
    worker: BlockWorker,
}

impl Harness {
    fn new(block: &Block, features: u64) -> Harness {
        let mem = test_mem();
        let tq = TestQueue::new(0x1000, 16);
        let irq = FakeInterrupt::new();
        let (queues, _kicks) = active_queues(&[tq]);
        let (vqs, _) = prepare_queues(&mem, queues, features, 1).unwrap();
        let worker = block
            .new_worker(Activation {
                mem: mem.clone(),
                interrupt: irq.clone(),
                queues: vqs,
                acked_features: features,
                counters: Arc::default(),
            })
            .unwrap();
        Harness {
            mem,
            tq,
            irq,
            worker,
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xAAu8, GuestAddress(STATUS)).unwrap();
    }

    /// Submits header + optional data + status as a 3-descriptor chain and processes it.
    /// Returns (status, used len).
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
        self.header(kind, sector);
        let mut bufs = vec![(HDR, 16, 0)];
        if let Some((len, writable)) = data {
            bufs.push((DATA, len, if writable { DESC_F_WRITE } else { 0 }));
        }
        bufs.push((STATUS, 1, DESC_F_WRITE));
        self.submit(&bufs)
    }

    fn submit(&mut self, bufs: &[(u64, u32, u16)]) -> (u8, u32) {
        let before = self.tq.used_idx(&self.mem);
        self.tq.add_chain(&self.mem, 0, bufs);
        self.worker.process_queue();
        assert_eq!(self.tq.used_idx(&self.mem), before.wrapping_add(1));
        let (head, len) = self.tq.used_elem(&self.mem, before);
        assert_eq!(head, 0);
        (self.status(), len)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }
}

#[test]
fn read_write_flush() {
    let disk = TempDisk::new(64 * 1024);
    let block = Block::new(&disk.0, false, None).unwrap();
    assert_eq!(block.capacity_sectors(), 128);
    let features = block.device_features() & !crate::virtio::worker::VIRTIO_RING_F_EVENT_IDX;
    let mut h = Harness::new(&block, features);

    // Read sectors 2..4.
    let (status, used) = h.request(VIRTIO_BLK_T_IN, 2, Some((1024, true)));
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 1025));
    assert_eq!(h.data(1024), disk.contents()[1024..2048]);

    // Write sector 5.
    let pattern: Vec<u8> = (0..512).map(|i| (i * 7) as u8).collect();
    h.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let (status, used) = h.request(VIRTIO_BLK_T_OUT, 5, Some((512, false)));
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(disk.contents()[2560..3072], pattern[..]);

    // Flush.
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, None), (VIRTIO_BLK_S_OK, 1));
    assert!(h.irq.signals_for(0) >= 3);
    assert_eq!(h.irq.errors(), 0);
}

fn disk_key(seed: u8) -> crypt::DiskKey {
    let bytes: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(13) ^ seed).collect();
    crypt::DiskKey::from_slice(&bytes).unwrap()
}

#[test]
fn encrypted_disk_holds_only_ciphertext() {
    let disk = TempDisk::new(64 * 1024);
    let block = Block::new(&disk.0, false, None)
        .unwrap()
        .with_encryption(&disk_key(1));
    assert!(block.is_encrypted());
    let features = block.device_features() & !crate::virtio::worker::VIRTIO_RING_F_EVENT_IDX;
    let mut h = Harness::new(&block, features);

    // The guest writes a marker over sectors 5 and 6 and reads it back.
    let marker: Vec<u8> = b"PV-DISK-MARKER:".repeat(70)[..1024].to_vec();
    h.mem.write_slice(&marker, GuestAddress(DATA)).unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 5, Some((1024, false))),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, None).0, VIRTIO_BLK_S_OK);
    h.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 5, Some((1024, true))),
        (VIRTIO_BLK_S_OK, 1025)
    );
    assert_eq!(h.data(1024), marker);
    // A read that starts inside the area uses that sector's tweak.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 6, Some((512, true))).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(h.data(512), marker[512..]);

    // The host file changed there, and holds no piece of the marker anywhere.
    let file = disk.contents();
    assert_ne!(file[2560..3584], marker[..]);
    assert!(!file.windows(8).any(|w| w == b"PV-DISK-"));

    // The same file opened with another key, or with none, does not read the marker.
    for other in [
        Block::new(&disk.0, true, None)
            .unwrap()
            .with_encryption(&disk_key(2)),
        Block::new(&disk.0, true, None).unwrap(),
    ] {
        let mut h = Harness::new(&other, features);
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 5, Some((1024, true))).0,
            VIRTIO_BLK_S_OK
        );
        let read = h.data(1024);
        assert_ne!(read, marker);
        assert!(!read.windows(8).any(|w| w == b"PV-DISK-"));
    }
}

#[test]
fn completed_writes_mark_their_chunks_for_migration() {
    // Three 64 KiB chunks.
    let disk = TempDisk::new(3 * 64 * 1024);
    let block = Block::new(&disk.0, false, None).unwrap();
    let dirty = block.dirty_chunks();
    let features = block.device_features() & !crate::virtio::worker::VIRTIO_RING_F_EVENT_IDX;
    let mut h = Harness::new(&block, features);

    // Reads, flushes and refused writes mark nothing.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, Some((4096, true))).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, None).0, VIRTIO_BLK_S_OK);
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 384, Some((512, false))).0,
        VIRTIO_BLK_S_IOERR,
        "sector 384 is past the end"
    );
    assert_eq!(dirty.take(), Vec::<u64>::new());

    // A write across the boundary of chunks 0 and 1 marks both, one in chunk 2 marks it.
    h.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 127, Some((1024, false))).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(dirty.take(), vec![0, 1]);
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 300, Some((512, false))).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(dirty.take(), vec![2]);
}

#[test]
fn read_only_refuses_writes() {
    let disk = TempDisk::new(8192);
    let before = disk.contents();
    let block = Block::new(&disk.0, true, None).unwrap();
    assert_ne!(block.device_features() & VIRTIO_BLK_F_RO, 0);
    let mut h = Harness::new(&block, block.device_features());
    h.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, Some((512, false))).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(disk.contents(), before);
    // Reads and flushes still work.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 1, Some((512, true))).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(h.data(512), before[512..1024]);
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, None).0, VIRTIO_BLK_S_OK);
}

#[test]
fn out_of_range_and_bad_lengths() {
    let disk = TempDisk::new(8192);
    let before = disk.contents();
    let block = Block::new(&disk.0, false, None).unwrap();
    let mut h = Harness::new(&block, 0);
    // Last sector is fine, one past is not, and a range straddling the end is not.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 15, Some((512, true))).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 16, Some((512, true))).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 15, Some((1024, false))).0,
        VIRTIO_BLK_S_IOERR
    );
    // Sector * 512 overflows.
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, u64::MAX / 256, Some((512, false)))
            .0,
        VIRTIO_BLK_S_IOERR
    );
    // Data not a whole number of sectors.
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, Some((100, false))).0,
        VIRTIO_BLK_S_IOERR
    );
    // A read with device-readable data, a write with device-writable data.
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, Some((512, false))).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, Some((512, true))).0,
        VIRTIO_BLK_S_IOERR
    );
    // More than the per-request cap (too big for the test's guest memory, so checked directly).
    assert_eq!(
        h.worker.io.check_range(0, MAX_REQUEST_BYTES + 512),
        Err(VIRTIO_BLK_S_IOERR)
    );
    assert_eq!(disk.contents(), before);
    assert_eq!(h.irq.errors(), 0);
}

#[test]
fn get_id_and_unsupported() {
    let disk = TempDisk::new(4096);
    let block = Block::new(&disk.0, false, Some("serial-123".into())).unwrap();
    let mut h = Harness::new(&block, 0);
    h.mem.write_slice(&[0xFF; 20], GuestAddress(DATA)).unwrap();
    let (status, used) = h.request(VIRTIO_BLK_T_GET_ID, 0, Some((20, true)));
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 21));
    let mut expect = [0u8; 20];
    expect[..10].copy_from_slice(b"serial-123");
    assert_eq!(h.data(20), expect);

    assert_eq!(h.request(11, 0, Some((512, false))).0, VIRTIO_BLK_S_UNSUPP);
    assert_eq!(h.request(0xdead, 0, None).0, VIRTIO_BLK_S_UNSUPP);

    // The default id is derived from the file and is not empty.
    let block = Block::new(&disk.0, false, None).unwrap();
    assert_ne!(block.id, [0u8; 20]);
    assert!(matches!(
        Block::new(&disk.0, false, Some("x".repeat(21))),
        Err(BlockError::IdTooLong(_))
    ));
}

#[test]
fn size_must_be_whole_sectors() {
    let disk = TempDisk::new(1000);
    let err = Block::new(&disk.0, false, None).err().expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, BlockError::Size { size: 1000, .. }));
    assert!(
        msg.contains("1000") && msg.contains(&*disk.0.to_string_lossy()),
        "{msg}"
    );
    assert!(matches!(
        Block::new(Path::new("/nonexistent/disk.img"), true, None),
        Err(BlockError::Open { .. })
    ));
}

#[test]
fn config_space() {
    let disk = TempDisk::new(64 * 1024);
    let block = Block::new(&disk.0, false, None).unwrap();
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    let mut w = [0u8; 4];
    block.read_config(12, &mut w);
    assert_eq!(u32::from_le_bytes(w), u32::from(QUEUE_SIZE - 2));
    block.read_config(20, &mut w);
    assert_eq!(u32::from_le_bytes(w), 512);
    block.read_config(u64::MAX - 1, &mut w);
    assert_eq!(w, [0; 4]);
}

#[test]
fn malformed_chains() {
    let disk = TempDisk::new(8192);
    let before = disk.contents();
    let block = Block::new(&disk.0, false, None).unwrap();
    let mut h = Harness::new(&block, 0);

    // Data descriptor past the end of guest memory: completed empty, nothing touched.
    h.header(VIRTIO_BLK_T_OUT, 0);
    let (status, used) = h.submit(&[
        (HDR, 16, 0),
        (0xF_FE00, 0x400, 0),
        (STATUS, 1, DESC_F_WRITE),
    ]);
    assert_eq!((status, used), (0xAA, 0));
    // Header in a device-writable descriptor: no readable header -> IOERR.
    h.header(VIRTIO_BLK_T_OUT, 0);
    let (status, _) = h.submit(&[(HDR, 16, DESC_F_WRITE), (STATUS, 1, DESC_F_WRITE)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    // Zero-length status after a read: the status lands in the data, whose length is then not
    // a whole sector -> IOERR, never a partial read.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
    let (_, used) = h.submit(&[
        (HDR, 16, 0),
        (DATA, 512, DESC_F_WRITE),
        (STATUS, 0, DESC_F_WRITE),
    ]);
    assert_eq!(used, 1);
    assert_eq!(h.data(512)[511], VIRTIO_BLK_S_IOERR);
    assert_eq!(h.data(511), vec![0u8; 511]);
    // No writable byte at all: completed with length 0.
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(h.submit(&[(HDR, 16, 0)]), (0xAA, 0));
    // A loop.
    h.header(VIRTIO_BLK_T_OUT, 0);
    h.tq.desc(&h.mem, 0, HDR, 16, DESC_F_NEXT, 1);
    h.tq.desc(&h.mem, 1, DATA, 512, DESC_F_NEXT, 0);
    h.tq.publish(&h.mem, 0);
    h.worker.process_queue();
    assert_eq!(h.tq.used_elem(&h.mem, h.tq.used_idx(&h.mem) - 1), (0, 0));
    // Indirect descriptor without the feature.
    h.tq.desc(&h.mem, 0, 0x40000, 48, DESC_F_INDIRECT, 0);
    h.tq.publish(&h.mem, 0);
    h.worker.process_queue();
    assert_eq!(h.tq.used_elem(&h.mem, h.tq.used_idx(&h.mem) - 1), (0, 0));
    assert_eq!(disk.contents(), before);
    assert_eq!(h.irq.errors(), 0);

    // A head index past the queue cannot be completed: device error, queue stops.
    h.tq.publish(&h.mem, 16);
    h.worker.process_queue();
    assert_eq!(h.irq.errors(), 1);
    let used = h.tq.used_idx(&h.mem);
    h.tq.add_chain(&h.mem, 0, &[(HDR, 16, 0), (STATUS, 1, DESC_F_WRITE)]);
    h.worker.process_queue();
    assert_eq!(h.tq.used_idx(&h.mem), used, "broken queue stays stopped");
}

#[test]
fn indirect_request() {
    let disk = TempDisk::new(8192);
    let block = Block::new(&disk.0, false, None).unwrap();
    let mut h = Harness::new(&block, VIRTIO_RING_F_INDIRECT_DESC);
    let table = GuestAddress(0x40000);
    h.header(VIRTIO_BLK_T_IN, 3);
    write_desc(&h.mem, table, 0, HDR, 16, DESC_F_NEXT, 1);
    write_desc(&h.mem, table, 1, DATA, 256, DESC_F_WRITE | DESC_F_NEXT, 2);
    write_desc(
        &h.mem,
        table,
        2,
        DATA + 256,
        256,
        DESC_F_WRITE | DESC_F_NEXT,
        3,
    );
    write_desc(&h.mem, table, 3, STATUS, 1, DESC_F_WRITE, 0);
    let (status, used) = h.submit(&[(table.0, 64, DESC_F_INDIRECT)]);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 513));
    assert_eq!(h.data(512), disk.contents()[1536..2048]);
}

#[test]
fn event_idx_suppresses_notifications() {
    let disk = TempDisk::new(8192);
    let block = Block::new(&disk.0, false, None).unwrap();
    let mut h = Harness::new(&block, crate::virtio::worker::VIRTIO_RING_F_EVENT_IDX);
    // used_event (after the avail ring) = 5: no interrupt until the 6th completion.
    let used_event = GuestAddress(h.tq.avail.0 + 4 + 2 * u64::from(h.tq.size));
    h.mem.write_obj(5u16.to_le(), used_event).unwrap();
    for i in 0..5 {
        h.request(VIRTIO_BLK_T_FLUSH, 0, None);
        assert_eq!(h.irq.signals_for(0), 0, "request {i}");
    }
    h.request(VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!(h.irq.signals_for(0), 1);
    // The device published avail_event = next_avail so the driver kicks on the next request.
    let avail_event = GuestAddress(h.tq.used.0 + 4 + 8 * u64::from(h.tq.size));
    let ev: u16 = h.mem.read_obj(avail_event).unwrap();
    assert_eq!(u16::from_le(ev), 6);
}

#[test]
fn worker_thread_serves_kicks() {
    let disk = TempDisk::new(8192);
    let mut block = Block::new(&disk.0, false, None).unwrap();
    let mem = test_mem();
    let irq = FakeInterrupt::new();
    for round in 0..2 {
        let tq = TestQueue::new(0x1000, 16);
        tq.set_avail_idx(&mem, 0);
        mem.write_obj(0u16, GuestAddress(tq.used.0 + 2)).unwrap();
        block.ack_features(block.device_features());
        let (queues, kicks) = active_queues(&[tq]);
        block.activate(mem.clone(), irq.clone(), queues).unwrap();
        let pattern = [round as u8 + 1; 512];
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        let mut hdr = [0u8; 16];
        hdr[0] = VIRTIO_BLK_T_OUT as u8;
        hdr[8] = 4;
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        tq.add_chain(
            &mem,
            0,
            &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, DESC_F_WRITE)],
        );
        kicks[0].write(1).unwrap();
        assert!(wait_until(|| tq.used_idx(&mem) == 1), "round {round}");
        assert_eq!(disk.contents()[2048..2560], pattern);
        block.reset();
    }
    assert_eq!(irq.errors(), 0);
}

/// Random descriptor tables never panic, never break the queue, and change the file only
/// through valid OUT requests (checked against a model of the disk).
#[test]
fn fuzz_random_chains() {
    let disk = TempDisk::new(16 * 512);
    let mut model = disk.contents();
    let block = Block::new(&disk.0, false, None).unwrap();
    let mut h = Harness::new(&block, VIRTIO_RING_F_INDIRECT_DESC);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut valid_writes = 0;
    let addrs = [
        HDR,
        DATA,
        DATA + 512,
        STATUS,
        0x40000,
        0xF_FFF0,
        0x10_0000,
        u64::MAX - 8,
    ];
    for iter in 0..4000 {
        // A random header.
        let kind =
            [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, 8, 99][rng.below(5) as usize];
        let sector = rng.below(20);
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        h.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        let fill = [rng.next() as u8; 1024];
        h.mem.write_slice(&fill, GuestAddress(DATA)).unwrap();
        // A random table: mostly plausible, sometimes garbage.
        let table = if rng.below(4) == 0 {
            GuestAddress(0x40000)
        } else {
            h.tq.desc
        };
        let n = 1 + rng.below(5) as u16;
        let plausible = rng.below(2) == 0;
        for i in 0..16u16 {
            let (mut addr, mut len, mut flags) = if plausible && i == 0 {
                (HDR, 16, 0)
            } else if plausible && i + 1 == n {
                (STATUS, 1, DESC_F_WRITE)
            } else if plausible {
                let w = if kind == VIRTIO_BLK_T_IN {
                    DESC_F_WRITE
                } else {
                    0
                };
                (DATA + 512 * u64::from(i - 1), 512, w)
            } else {
                (
                    addrs[rng.below(addrs.len() as u64) as usize],
                    [0, 1, 16, 100, 512, 1024, 0xFFFF_FFFF][rng.below(7) as usize],
                    [0, DESC_F_WRITE][rng.below(2) as usize],
                )
            };
            // Occasional mutations of any field.
            match rng.below(24) {
                0 => addr = addr.wrapping_add(rng.next() >> rng.below(64)),
                1 => len = rng.next() as u32,
                2 => flags ^= DESC_F_WRITE,
                3 => flags |= DESC_F_INDIRECT,
                _ => {}
            }
            if i + 1 < n || rng.below(16) == 0 {
                flags |= DESC_F_NEXT;
            }
            let next = if rng.below(16) == 0 {
                rng.below(20) as u16
            } else {
                i + 1
            };
            write_desc(&h.mem, table, i, addr, len, flags, next);
        }
        if table != h.tq.desc {
            h.tq.desc(&h.mem, 0, table.0, 16 * u32::from(n), DESC_F_INDIRECT, 0);
        }
        // Predict the effect of a valid write from the same chain the device will see.
        let chain = crate::virtio::chain::parse_chain(&h.mem, h.tq.desc, 16, 0, true);
        let expected = chain.ok().and_then(|chain| {
            let mut hdr = [0u8; 16];
            chain.read_at(&h.mem, 0, &mut hdr).ok()?;
            let (kind, sector) = parse_header(&hdr);
            let data_r = chain.readable_len() - 16;
            let fits = sector
                .checked_mul(512)
                .and_then(|at| at.checked_add(data_r as u64))
                .is_some_and(|end| end <= model.len() as u64);
            if kind != VIRTIO_BLK_T_OUT || chain.writable_len() != 1 || data_r % 512 != 0 || !fits {
                return None;
            }
            let mut data = vec![0u8; data_r];
            chain.read_at(&h.mem, 16, &mut data).ok()?;
            Some((sector as usize * 512, data))
        });
        let before = h.tq.used_idx(&h.mem);
        h.tq.publish(&h.mem, 0);
        h.worker.process_queue();
        assert_eq!(
            h.tq.used_idx(&h.mem),
            before.wrapping_add(1),
            "iteration {iter}"
        );
        if let Some((at, data)) = expected {
            model[at..at + data.len()].copy_from_slice(&data);
            valid_writes += 1;
        }
        assert!(
            disk.contents() == model,
            "iteration {iter}: file differs from the model"
        );
    }
    assert_eq!(h.irq.errors(), 0);
    assert!(
        valid_writes > 20,
        "the fuzz loop exercised {valid_writes} valid writes"
    );
}
