//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`; also compiled and
//! smoke-tested by `cargo test -p devices`, so a change that breaks them shows up here).
//!
//! Each entry takes the fuzzer's bytes as what a hostile guest controls: the first bytes pick
//! the negotiated features (or the chain's head), the rest is guest memory from address 0,
//! holding the rings of queue `i` at `i * 0x400` (16 entries each) and whatever descriptors,
//! indirect tables and buffers the fuzzer lays out. The device code runs as on its worker
//! thread, synchronously. A panic, a hang or an out-of-bounds access is a finding; so is a
//! broken invariant checked here.
//!
//! The functions called are the narrow, public ones: [`parse_chain`] and the [`Chain`]
//! accessors; for each device `VirtioDevice::{ack_features, prepare_queues, start}` and the
//! worker's `DeviceWorker::{queue_kicked, backend_event}`; `PciConfigIo`/`PciConfigMmio` over
//! a `PciRoot`.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{Epoll, EventSet};

use crate::bus::{lock, BusDevice};
use crate::pci::testing::FakeHooks;
use crate::pci::{PciConfigIo, PciConfigMmio, PciRoot};
use crate::virtio::balloon::{
    queue_role, Balloon, BalloonConfig, VIRTIO_BALLOON_F_PAGE_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};
use crate::virtio::block::Block;
use crate::virtio::chain::{parse_chain, Chain, ChainError};
use crate::virtio::gpu::{Gpu, GpuConfig};
use crate::virtio::input::{Input, InputKind};
use crate::virtio::net::{Net, NetBackend};
use crate::virtio::pci::VirtioPciDevice;
use crate::virtio::rng::Rng;
use crate::virtio::vsock::Vsock;
use crate::virtio::worker::testing::{active_queues, FakeInterrupt, TestQueue};
use crate::virtio::worker::{
    DeviceWorker, BACKEND_TOKEN_BASE, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::{Activation, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::GuestMem;

/// Guest memory size: small, so that random addresses often land inside.
const MEM_SIZE: usize = 64 << 10;
/// Entries per queue.
const QUEUE_SIZE: u16 = 16;
/// Distance between two queues' rings.
const QUEUE_STRIDE: u64 = 0x400;

/// Guest memory holding `image` from address 0 (the rest zero).
fn guest_mem(image: &[u8]) -> GuestMem {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let n = image.len().min(MEM_SIZE);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("the image fits guest memory");
    mem
}

/// Features from the first input byte: indirect descriptors and event index on demand.
fn ring_features(b: u8) -> u64 {
    let mut f = VIRTIO_F_VERSION_1;
    if b & 1 != 0 {
        f |= VIRTIO_RING_F_INDIRECT_DESC;
    }
    if b & 2 != 0 {
        f |= VIRTIO_RING_F_EVENT_IDX;
    }
    f
}

/// Guest memory from `image`, `n` queues of `dev` laid out in it, and `dev` started over
/// them with the features in `f` (and `extra`) it offers: its worker, as its worker thread
/// would hold it, and the memory.
fn start(
    dev: &mut dyn VirtioDevice,
    n: usize,
    f: u8,
    extra: u64,
    image: &[u8],
) -> Option<(Box<dyn DeviceWorker>, GuestMem)> {
    dev.ack_features(ring_features(f) | extra);
    let mem = guest_mem(image);
    let tqs: Vec<TestQueue> = (0..n)
        .map(|i| TestQueue::new(i as u64 * QUEUE_STRIDE, QUEUE_SIZE))
        .collect();
    let (active, _kicks) = active_queues(&tqs);
    let (queues, _) = dev.prepare_queues(&mem, active).ok()?;
    let worker = dev
        .start(Activation {
            mem: mem.clone(),
            interrupt: FakeInterrupt::new(),
            queues,
            acked_features: dev.base().acked_features(),
            counters: Arc::default(),
        })
        .ok()?;
    Some((worker, mem))
}

/// Kicks every queue of `worker` in the order the input's second byte picks, twice.
fn kick_all(worker: &mut dyn DeviceWorker, n: usize, order: u8) {
    let epoll = Epoll::new().expect("epoll");
    for round in 0..2 {
        for i in 0..n {
            let q = (i + usize::from(order >> (round * 4))) % n;
            worker.queue_kicked(&epoll, q);
        }
    }
}

/// Splits `data` into (features byte, order byte, memory image).
fn split(data: &[u8]) -> Option<(u8, u8, &[u8])> {
    match data {
        [f, o, image @ ..] => Some((*f, *o, image)),
        _ => None,
    }
}

/// The descriptor-chain walker: `data` = flags (bit 0: indirect negotiated), head (2 bytes),
/// queue size exponent, memory image whose descriptor table is at 0.
pub fn chain(data: &[u8]) {
    let [flags, h0, h1, size_exp, image @ ..] = data else {
        return;
    };
    let mem = guest_mem(image);
    let size = 1u16 << (size_exp % 16);
    let head = u16::from_le_bytes([*h0, *h1]);
    let indirect = flags & 1 != 0;
    let Ok(chain) = parse_chain(&mem, GuestAddress(0), size, head, indirect) else {
        return;
    };
    check_chain(&mem, &chain);
}

/// What a parsed chain promises: segments inside memory, lengths that add up, accesses
/// inside the streams succeed and accesses past them fail.
fn check_chain(mem: &GuestMem, chain: &Chain) {
    for (segs, total) in [
        (chain.readable_segments(), chain.readable_len()),
        (chain.writable_segments(), chain.writable_len()),
    ] {
        let mut sum = 0usize;
        for s in segs {
            assert!(s.len > 0, "empty segment in {chain:?}");
            let last = s
                .addr
                .checked_add(u64::from(s.len) - 1)
                .expect("segment wraps");
            assert!(mem.address_in_range(s.addr) && mem.address_in_range(last));
            sum += s.len as usize;
        }
        assert_eq!(sum, total, "segment lengths of {chain:?}");
    }
    let r = chain.readable_len();
    let w = chain.writable_len();
    let mut buf = vec![0u8; r];
    assert_eq!(chain.read_at(mem, 0, &mut buf), Ok(()));
    assert_eq!(
        chain.read_at(mem, r, &mut [0u8]),
        Err(ChainError::OutOfBounds)
    );
    assert_eq!(
        chain.read_at(mem, usize::MAX, &mut [0u8]),
        Err(ChainError::OutOfBounds)
    );
    let data = vec![0x5au8; w];
    assert_eq!(chain.write_at(mem, 0, &data), Ok(()));
    assert_eq!(chain.write_at(mem, w, &[0u8]), Err(ChainError::OutOfBounds));
    assert_eq!(
        chain.write_at(mem, usize::MAX, &[0u8]),
        Err(ChainError::OutOfBounds)
    );
}

/// A scratch directory for backing files and sockets, one per process.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("pv-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

/// Block requests (header, sectors, data, status) on queue 0 of a 64 KiB disk; the order
/// byte's bit 0 makes the disk read-only.
pub fn block(data: &[u8]) {
    let _ = run_block(data);
}

fn run_block(data: &[u8]) -> Option<GuestMem> {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    let (f, o, image) = split(data)?;
    let path = DISK.get_or_init(|| {
        let p = scratch().join("disk.img");
        std::fs::write(&p, vec![0xa5u8; 64 << 10]).expect("disk image");
        p
    });
    let mut block = Block::new(path, o & 1 != 0, Some("fuzz".into())).ok()?;
    let (mut w, mem) = start(&mut block, 1, f, 0, image)?;
    kick_all(&mut *w, 1, 0);
    Some(mem)
}

/// virtio-gpu commands on the control queue (0) and the cursor queue (1), with small
/// resource limits so creations hit them.
pub fn gpu(data: &[u8]) {
    let _ = run_gpu(data);
}

fn run_gpu(data: &[u8]) -> Option<GuestMem> {
    let (f, o, image) = split(data)?;
    let config = GpuConfig {
        width: 64,
        height: 64,
        max_resources: 4,
        max_host_bytes: 1 << 16,
    };
    let mut gpu = Gpu::new(config).ok()?;
    let (mut w, mem) = start(&mut gpu, 2, f, 0, image)?;
    kick_all(&mut *w, 2, o);
    let _ = gpu.display().frame();
    Some(mem)
}

/// virtio-input event buffers (queue 0, with a touch already pending) and status buffers (1).
pub fn input(data: &[u8]) {
    let _ = run_input(data);
}

fn run_input(data: &[u8]) -> Option<GuestMem> {
    let (f, o, image) = split(data)?;
    let kind = InputKind::Touch {
        width: 64,
        height: 64,
        slots: 2,
    };
    let mut input = Input::new(kind).ok()?;
    let _ = input.handle().touch(1, 3, 4);
    let (mut w, mem) = start(&mut input, 2, f, 0, image)?;
    kick_all(&mut *w, 2, o);
    Some(mem)
}

/// Entropy requests on queue 0.
pub fn rng(data: &[u8]) {
    let _ = run_rng(data);
}

fn run_rng(data: &[u8]) -> Option<GuestMem> {
    let (f, _, image) = split(data)?;
    let (mut w, mem) = start(&mut Rng::new(), 1, f, 0, image)?;
    kick_all(&mut *w, 1, 0);
    Some(mem)
}

/// One datagram is one frame (with its virtio-net header).
struct Dgram(UnixDatagram);

impl std::os::fd::AsRawFd for Dgram {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Dgram {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(buf)
    }
    fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send(buf)
    }
}

/// Net transmit (header + frame) and receive buffers on queues 0 (rx) and 1 (tx); the
/// backend holds `order & 3` frames of lengths taken from the input for rx.
pub fn net(data: &[u8]) {
    let _ = run_net(data);
}

fn run_net(data: &[u8]) -> Option<GuestMem> {
    let (f, o, image) = split(data)?;
    let (ours, peer) = UnixDatagram::pair().ok()?;
    let _ = ours.set_nonblocking(true);
    let _ = peer.set_nonblocking(true);
    for i in 0..usize::from(o & 3) {
        let len = image.get(i).map_or(12, |&b| 12 + usize::from(b) * 8);
        let _ = peer.send(&vec![u8::try_from(i).unwrap_or(0); len]);
    }
    let backend: Arc<dyn NetBackend> = Arc::new(Dgram(ours));
    let mut net = Net::with_backend(backend, Some([2, 0, 0, 0, 0, 1])).ok()?;
    let (mut w, mem) = start(&mut net, 2, f, 0, image)?;
    kick_all(&mut *w, 2, o >> 2);
    let epoll = Epoll::new().expect("epoll");
    w.backend_event(&epoll, BACKEND_TOKEN_BASE, EventSet::IN);
    Some(mem)
}

/// Vsock packets (header, op, ports, credit) on the tx queue, rx and event buffers; the
/// host side has no listeners, so connection requests are refused.
pub fn vsock(data: &[u8]) {
    let _ = run_vsock(data);
}

fn run_vsock(data: &[u8]) -> Option<GuestMem> {
    static VSOCK: OnceLock<Mutex<Vsock>> = OnceLock::new();
    let (f, o, image) = split(data)?;
    let dev = VSOCK.get_or_init(|| {
        let p = scratch().join("vsock.sock");
        Mutex::new(Vsock::new(3, &p).expect("vsock device"))
    });
    let mut dev = lock(dev);
    if o & 1 != 0 {
        // As after a restore: the driver is owed a transport reset event.
        dev.restored();
    }
    let (mut w, mem) = start(&mut *dev, 3, f, 0, image)?;
    kick_all(&mut *w, 3, o >> 1);
    Some(mem)
}

/// Balloon page lists (inflate, deflate, free page reports) and statistics; the features
/// byte's bits 2-3 negotiate the stats and reporting queues.
pub fn balloon(data: &[u8]) {
    let _ = run_balloon(data);
}

fn run_balloon(data: &[u8]) -> Option<GuestMem> {
    let (f, o, image) = split(data)?;
    let mut extra = 0;
    if f & 4 != 0 {
        extra |= VIRTIO_BALLOON_F_STATS_VQ;
    }
    if f & 8 != 0 {
        extra |= VIRTIO_BALLOON_F_PAGE_REPORTING;
    }
    let n = (0..5).map_while(|i| queue_role(i, extra)).count();
    let mut balloon = Balloon::new(MEM_SIZE as u64, BalloonConfig::default()).ok()?;
    let _ = balloon.handle().set_target_mib(0);
    let (mut w, mem) = start(&mut balloon, n, f, extra, image)?;
    kick_all(&mut *w, n, o);
    Some(mem)
}

/// PCI configuration space through 0xcf8/0xcfc and ECAM: a host bridge and a virtio-pci rng.
/// Each operation is 8 bytes: kind, offset (3 bytes), value (4 bytes).
pub fn pci_config(data: &[u8]) {
    let hooks = Arc::new(FakeHooks::default());
    let mem = guest_mem(&[]);
    let Ok(dev) = VirtioPciDevice::new(Box::new(Rng::new()), mem, hooks) else {
        return;
    };
    let root = Arc::new(Mutex::new(PciRoot::new(0xc000_0000, 0x100_0000)));
    if lock(&root).add_device(Arc::new(Mutex::new(dev))).is_err() {
        return;
    }
    let ids = |root: &Arc<Mutex<PciRoot>>| {
        let r = lock(root);
        (r.config_read(0, 0, 0, 0), r.config_read(0, 1, 0, 0))
    };
    let before = ids(&root);
    let mut io = PciConfigIo::new(root.clone());
    let mut ecam = PciConfigMmio::new(root.clone());
    for op in data.chunks_exact(8) {
        let offset = u64::from(u32::from_le_bytes([op[1], op[2], op[3], 0]));
        let value = [op[4], op[5], op[6], op[7]];
        let len = [1usize, 2, 4, 3][usize::from(op[0] >> 4 & 3)];
        let mut out = [0u8; 4];
        match op[0] & 7 {
            0 => io.write(0, &value),
            1 => io.write(4 + offset % 4, &value[..len]),
            2 => io.read(4 + offset % 4, &mut out[..len]),
            3 => io.write(offset % 8, &value[..len]),
            4 => ecam.write(offset & 0xf_ffff, &value[..len]),
            5 => ecam.read(offset & 0xf_ffff, &mut out[..len]),
            6 => {
                // A BAR access where the guest programmed it, if anywhere.
                let addr = 0xc000_0000 + (offset & 0xff_ffff);
                let found = lock(&root).find_bar(addr, len);
                let _ = found.map(|(d, bar, off)| {
                    let mut d = lock(&d);
                    d.bar_read(bar, off, &mut out[..len]);
                });
            }
            _ => lock(&root).refresh_all(),
        }
    }
    // Vendor and device IDs are read-only.
    assert_eq!(ids(&root), before);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::{DESC_F_INDIRECT, DESC_F_WRITE};
    use crate::virtio::worker::testing::write_desc;

    /// An input for the device entries: features and order bytes, then `mem`'s first 16 KiB.
    fn input(f: u8, o: u8, mem: &GuestMem) -> Vec<u8> {
        let mut image = vec![0u8; 16 << 10];
        mem.read_slice(&mut image, GuestAddress(0)).unwrap();
        [vec![f, o], image].concat()
    }

    fn queue(i: u64) -> TestQueue {
        TestQueue::new(i * QUEUE_STRIDE, QUEUE_SIZE)
    }

    /// The entries reach the devices: a well-formed request in the input is served.
    #[test]
    fn well_formed_requests_are_served() {
        // Block: read sector 2 (the disk is 0xa5 throughout).
        let mem = guest_mem(&[]);
        let mut hdr = [0u8; 16];
        hdr[8..16].copy_from_slice(&2u64.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x1600)).unwrap();
        queue(0).add_chain(
            &mem,
            0,
            &[
                (0x1000, 16, 0),
                (0x1200, 512, DESC_F_WRITE),
                (0x1600, 1, DESC_F_WRITE),
            ],
        );
        let out = run_block(&input(0, 0, &mem)).unwrap();
        assert_eq!(
            out.read_obj::<u8>(GuestAddress(0x1600)).unwrap(),
            0,
            "status OK"
        );
        assert_eq!(out.read_obj::<u8>(GuestAddress(0x1300)).unwrap(), 0xa5);
        assert_eq!(queue(0).used_elem(&out, 0), (0, 513));

        // Rng: one buffer, through an indirect table.
        let mem = guest_mem(&[]);
        write_desc(&mem, GuestAddress(0x2000), 0, 0x1000, 64, DESC_F_WRITE, 0);
        queue(0).add_chain(&mem, 0, &[(0x2000, 16, DESC_F_INDIRECT)]);
        let out = run_rng(&input(1, 0, &mem)).unwrap();
        assert_eq!(queue(0).used_elem(&out, 0), (0, 64));

        // Net: a frame sent (tx, queue 1) and one received (rx, queue 0).
        let mem = guest_mem(&[]);
        queue(0).add_chain(&mem, 0, &[(0x1000, 1526, DESC_F_WRITE)]);
        queue(1).add_chain(&mem, 0, &[(0x2000, 12 + 60, 0)]);
        let out = run_net(&input(0, 1, &mem)).unwrap();
        assert_eq!(queue(1).used_idx(&out), 1);
        assert_eq!(queue(0).used_idx(&out), 1);

        // Vsock: a connection request to a port nobody listens on is answered with a reset.
        let mem = guest_mem(&[]);
        let mut pkt = [0u8; 44];
        pkt[0..8].copy_from_slice(&3u64.to_le_bytes());
        pkt[8..16].copy_from_slice(&2u64.to_le_bytes());
        pkt[16..20].copy_from_slice(&1234u32.to_le_bytes());
        pkt[20..24].copy_from_slice(&9999u32.to_le_bytes());
        pkt[28..30].copy_from_slice(&1u16.to_le_bytes()); // stream
        pkt[30..32].copy_from_slice(&1u16.to_le_bytes()); // REQUEST
        mem.write_slice(&pkt, GuestAddress(0x2000)).unwrap();
        queue(1).add_chain(&mem, 0, &[(0x2000, 44, 0)]);
        queue(0).add_chain(&mem, 0, &[(0x1000, 44 + 256, DESC_F_WRITE)]);
        let out = run_vsock(&input(0, 0, &mem)).unwrap();
        assert_eq!(queue(1).used_idx(&out), 1);
        assert_eq!(queue(0).used_idx(&out), 1);
        let op: u16 = out.read_obj(GuestAddress(0x1000 + 30)).unwrap();
        assert_eq!(op, 3, "VIRTIO_VSOCK_OP_RST");

        // Balloon: inflate two pages.
        let mem = guest_mem(&[]);
        mem.write_slice(&[4, 0, 0, 0, 5, 0, 0, 0], GuestAddress(0x1000))
            .unwrap();
        queue(0).add_chain(&mem, 0, &[(0x1000, 8, 0)]);
        let out = run_balloon(&input(0, 0, &mem)).unwrap();
        assert_eq!(queue(0).used_idx(&out), 1);
    }

    /// Every entry runs on empty, short and patterned inputs without a finding.
    #[test]
    fn entries_survive_simple_inputs() {
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
        let entries: [fn(&[u8]); 9] = [
            chain,
            block,
            rng,
            net,
            vsock,
            balloon,
            pci_config,
            gpu,
            super::input,
        ];
        for entry in entries {
            for input in [&[][..], &[1, 2, 3], &[0xff; 64], &pattern[..]] {
                entry(input);
            }
        }
    }
}
