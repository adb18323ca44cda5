//! [`VirtQueue`] notification suppression (`VIRTIO_RING_F_EVENT_IDX`).

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::chain::DESC_F_WRITE;
use crate::virtio::worker::testing::*;

/// A queue of 16 entries whose driver and device are both at ring position `start`.
fn queue_at(mem: &GuestMem, tq: TestQueue, event_idx: bool, start: u16) -> VirtQueue {
    let (queues, _kicks) = active_queues(&[tq]);
    let features = if event_idx {
        VIRTIO_RING_F_EVENT_IDX
    } else {
        0
    };
    let (mut vqs, _) = prepare_queues(mem, queues, features, 1).unwrap();
    let mut vq = vqs.pop().unwrap();
    vq.queue.set_next_avail(start);
    vq.queue.set_next_used(start);
    tq.set_avail_idx(mem, start);
    mem.write_obj(start.to_le(), GuestAddress(tq.used.0 + 2))
        .unwrap();
    vq
}

/// The driver's `used_event`: interrupt me once the used index passes this value.
fn set_used_event(mem: &GuestMem, tq: TestQueue, value: u16) {
    let at = tq.avail.0 + 4 + 2 * u64::from(tq.size);
    mem.write_obj(value.to_le(), GuestAddress(at)).unwrap();
}

/// The driver queues `n` buffers; the device serves them until the ring is empty (as every
/// worker does), then notifies once.
fn serve(mem: &GuestMem, tq: TestQueue, vq: &mut VirtQueue, irq: &FakeInterrupt, n: u16) {
    for i in 0..n {
        tq.add_chain(mem, i, &[(0x10000, 8, DESC_F_WRITE)]);
    }
    let mut served = 0;
    while let Some(popped) = vq.pop(mem, irq) {
        let Popped::Chain(chain) = popped else {
            panic!("malformed chain");
        };
        assert!(vq.complete(mem, irq, chain.head, 8));
        served += 1;
    }
    assert_eq!(served, n);
    vq.notify(mem, irq);
}

#[test]
fn without_event_idx_every_batch_is_notified_once() {
    let mem = test_mem();
    let tq = TestQueue::new(0x1000, 16);
    let irq = FakeInterrupt::new();
    let mut vq = queue_at(&mem, tq, false, 0);
    set_used_event(&mem, tq, 100);
    serve(&mem, tq, &mut vq, &irq, 3);
    assert_eq!(
        irq.signals_for(0),
        1,
        "used_event is ignored without the feature"
    );
    // Nothing completed since: no interrupt.
    vq.notify(&mem, &*irq);
    assert_eq!(irq.signals_for(0), 1);
}

#[test]
fn event_idx_notifies_only_when_used_passes_used_event() {
    let mem = test_mem();
    let tq = TestQueue::new(0x1000, 16);
    let irq = FakeInterrupt::new();
    let mut vq = queue_at(&mem, tq, true, 0);
    // The driver wants to hear once entry 1 is used: used goes 0 -> 3.
    set_used_event(&mem, tq, 1);
    serve(&mem, tq, &mut vq, &irq, 3);
    assert_eq!(irq.signals_for(0), 1);
    // Suppressed: used goes 3 -> 6, the driver asked for 10.
    set_used_event(&mem, tq, 10);
    serve(&mem, tq, &mut vq, &irq, 3);
    assert_eq!(irq.signals_for(0), 1, "interrupt not suppressed");
    // used goes 6 -> 11, past 10: one interrupt for the whole batch.
    serve(&mem, tq, &mut vq, &irq, 5);
    assert_eq!(irq.signals_for(0), 2);
    // used_event already behind: 11 -> 12 does not cross 10 again.
    serve(&mem, tq, &mut vq, &irq, 1);
    assert_eq!(irq.signals_for(0), 2);
    // The device asks to be kicked at its next available position.
    let avail_event = GuestAddress(tq.used.0 + 4 + 8 * u64::from(tq.size));
    assert_eq!(u16::from_le(mem.read_obj(avail_event).unwrap()), 12);
}

#[test]
fn event_idx_comparison_wraps_around() {
    let mem = test_mem();
    let tq = TestQueue::new(0x1000, 16);
    let irq = FakeInterrupt::new();
    // used goes 65534 -> 1, crossing used_event 0.
    let mut vq = queue_at(&mem, tq, true, u16::MAX - 1);
    set_used_event(&mem, tq, 0);
    serve(&mem, tq, &mut vq, &irq, 3);
    assert_eq!(irq.signals_for(0), 1);
    assert_eq!(tq.used_idx(&mem), 1);
    // 1 -> 4 with used_event 65535 (behind): suppressed.
    set_used_event(&mem, tq, u16::MAX);
    serve(&mem, tq, &mut vq, &irq, 3);
    assert_eq!(irq.signals_for(0), 1);
}
