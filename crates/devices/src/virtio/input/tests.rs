// Test data: hand-built guest-side values and small constants, narrowed on purpose.
#![allow(clippy::cast_possible_truncation)]

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::chain::DESC_F_WRITE;
use crate::virtio::worker::testing::*;

/// Selects (`select`, `subsel`) and returns (size, union bytes).
fn config(dev: &mut Input, sel: u8, sub: u8) -> Vec<u8> {
    dev.write_config(0, &[sel, sub]);
    let mut size = [0u8];
    dev.read_config(2, &mut size);
    let mut union = vec![0u8; usize::from(size[0])];
    dev.read_config(8, &mut union);
    union
}

fn has_bit(map: &[u8], bit: u16) -> bool {
    map.get(usize::from(bit / 8))
        .is_some_and(|b| b & (1 << (bit % 8)) != 0)
}

#[test]
fn config_space_describes_keyboard_and_touchscreen() {
    let mut kbd = Input::new(InputKind::Keyboard).unwrap();
    assert_eq!(
        config(&mut kbd, select::ID_NAME, 0),
        b"pocketvisor keyboard"
    );
    let keys = config(&mut kbd, select::EV_BITS, ev::KEY as u8);
    assert!(has_bit(&keys, 30) && has_bit(&keys, 255) && !has_bit(&keys, 0));
    assert!(config(&mut kbd, select::EV_BITS, ev::ABS as u8).is_empty());
    assert!(config(&mut kbd, select::ABS_INFO, ev::ABS_X as u8).is_empty());
    assert!(
        config(&mut kbd, 0x7f, 0).is_empty(),
        "unknown select has size 0"
    );

    let kind = InputKind::Touch {
        width: 720,
        height: 1280,
        slots: 10,
    };
    let mut touch = Input::new(kind).unwrap();
    assert_eq!(
        config(&mut touch, select::ID_NAME, 0),
        b"pocketvisor touchscreen"
    );
    assert_eq!(config(&mut touch, select::ID_DEVIDS, 0).len(), 8);
    assert!(has_bit(
        &config(&mut touch, select::PROP_BITS, 0),
        ev::INPUT_PROP_DIRECT
    ));
    let abs = config(&mut touch, select::EV_BITS, ev::ABS as u8);
    for axis in [
        ev::ABS_MT_SLOT,
        ev::ABS_MT_POSITION_X,
        ev::ABS_MT_TRACKING_ID,
    ] {
        assert!(has_bit(&abs, axis), "axis {axis:#x}");
    }
    let info = config(&mut touch, select::ABS_INFO, ev::ABS_MT_POSITION_Y as u8);
    assert_eq!(&info[4..8], &1279u32.to_le_bytes());
    let info = config(&mut touch, select::ABS_INFO, ev::ABS_MT_SLOT as u8);
    assert_eq!(&info[4..8], &9u32.to_le_bytes());
    // Reads past the config space are zero, writes there are ignored.
    let mut b = [0xffu8; 4];
    touch.read_config(200, &mut b);
    assert_eq!(b, [0; 4]);
    touch.write_config(300, &[1]);
}

#[test]
fn injected_events_reach_the_driver_buffers_in_order() {
    let mem = test_mem();
    let queues = [TestQueue::new(0x1000, 16), TestQueue::new(0x3000, 16)];
    let irq = FakeInterrupt::new();
    let kind = InputKind::Touch {
        width: 100,
        height: 200,
        slots: 2,
    };
    let mut dev = Input::new(kind).unwrap();
    dev.ack_features(dev.device_features());
    let handle = dev.handle();
    let (active, kicks) = active_queues(&queues);
    dev.activate(mem.clone(), irq.clone(), active).unwrap();

    // Events sent before the driver has buffers wait for them.
    handle.key(ev::BTN_TOUCH, true).unwrap();
    handle.touch(1, 99, 199).unwrap();
    assert!(handle.touch(2, 0, 0).is_err(), "no slot 2");
    assert!(handle.touch(0, 100, 0).is_err(), "x outside the screen");
    for slot in 0..12u16 {
        queues[0].add_chain(
            &mem,
            slot,
            &[(0x10000 + 8 * u64::from(slot), 8, DESC_F_WRITE)],
        );
    }
    kicks[0].write(1).unwrap();
    assert!(wait_until(|| queues[0].used_idx(&mem) == 10));
    let event = |n: u64| {
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(0x10000 + 8 * n))
            .unwrap();
        (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    };
    assert_eq!(event(0), (ev::KEY, ev::BTN_TOUCH, 1));
    assert_eq!(event(1), (ev::SYN, ev::SYN_REPORT, 0));
    assert_eq!(event(2), (ev::ABS, ev::ABS_MT_SLOT, 1));
    assert_eq!(event(4), (ev::ABS, ev::ABS_MT_POSITION_X, 99));
    assert_eq!(event(5), (ev::ABS, ev::ABS_MT_POSITION_Y, 199));
    assert_eq!(event(9), (ev::SYN, ev::SYN_REPORT, 0));
    assert_eq!(queues[0].used_elem(&mem, 0), (0, 8));

    // With buffers waiting, an injection is delivered at once (no kick from the driver).
    handle.release(1).unwrap();
    assert!(wait_until(|| queues[0].used_idx(&mem) == 12));
    assert_eq!(event(10), (ev::ABS, ev::ABS_MT_SLOT, 1));
    assert_eq!(event(11), (ev::ABS, ev::ABS_MT_TRACKING_ID, u32::MAX));
    assert!(irq.signals_for(0) >= 1);

    // The VMM's control requests inject the same way; bad ones are refused.
    let control = dev.control().unwrap();
    let touch = serde_json::json!({"op": "touch", "slot": 0, "x": 5, "y": 6});
    control.control(&touch).unwrap();
    for bad in [
        serde_json::json!({"op": "touch", "slot": 0, "x": 500, "y": 6}),
        serde_json::json!({"op": "key", "code": 70000, "down": true}),
        serde_json::json!({"op": "swipe"}),
    ] {
        assert!(control.control(&bad).is_err(), "{bad}");
    }
    for slot in 12..16u16 {
        queues[0].add_chain(
            &mem,
            slot,
            &[(0x10000 + 8 * u64::from(slot), 8, DESC_F_WRITE)],
        );
    }
    kicks[0].write(1).unwrap();
    assert!(wait_until(|| queues[0].used_idx(&mem) == 16));
    // The rest of the release waited for buffers, then the touch follows it.
    assert_eq!(event(12), (ev::KEY, ev::BTN_TOUCH, 0));
    assert_eq!(event(13), (ev::SYN, ev::SYN_REPORT, 0));
    assert_eq!(event(14), (ev::ABS, ev::ABS_MT_SLOT, 0));

    // Status buffers (LEDs) are taken and dropped.
    queues[1].add_chain(&mem, 0, &[(0x20000, 8, 0)]);
    kicks[1].write(1).unwrap();
    assert!(wait_until(|| queues[1].used_idx(&mem) == 1));

    // A driver that never reads: the bounded queue refuses more.
    let flood = vec![InputEvent::sync(); MAX_PENDING];
    // Six events of the touch are still pending.
    handle.send(&flood[..MAX_PENDING - 8]).unwrap();
    assert!(matches!(handle.send(&flood[..8]), Err(InputError::Full)));
    // Reset forgets what was pending.
    dev.reset();
    handle.send(&flood).unwrap();
    assert_eq!(irq.errors(), 0);
}

fn pending(dev: &Input) -> Vec<InputEvent> {
    dev.shared.pending.lock().unwrap().iter().copied().collect()
}

#[test]
fn snapshots_carry_the_selector_and_undelivered_events() {
    let kind = InputKind::Touch {
        width: 100,
        height: 200,
        slots: 2,
    };
    let mut dev = Input::new(kind).unwrap();
    dev.write_config(0, &[select::ABS_INFO, ev::ABS_X as u8]);
    dev.handle().touch(1, 10, 20).unwrap();
    let saved = dev.save_state();
    let before = pending(&dev);
    assert_eq!(before.len(), 8);

    let mut restored = Input::new(kind).unwrap();
    restored.restore_state(&saved).unwrap();
    assert_eq!(pending(&restored), before, "undelivered events survive");
    let mut size = [0u8];
    restored.read_config(2, &mut size);
    assert_eq!(
        size[0], 20,
        "the selector survives (an abs_info is 20 bytes)"
    );

    // A snapshot from before input devices saved anything: nothing pending.
    let mut old = Input::new(kind).unwrap();
    old.restore_state(&[]).unwrap();
    assert!(pending(&old).is_empty());
}

#[test]
fn bad_input_state_is_refused_and_changes_nothing() {
    let kind = InputKind::Keyboard;
    let dev = Input::new(kind).unwrap();
    dev.handle().key(30, true).unwrap();
    let good = dev.save_state();
    let touch = Input::new(InputKind::Touch {
        width: 10,
        height: 10,
        slots: 1,
    })
    .unwrap()
    .save_state();
    let mut too_many = good.clone();
    too_many[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut bad_version = good.clone();
    bad_version[0] = 99;
    for bad in [
        &good[..good.len() - 1],
        &good[..3],
        &touch[..],
        &too_many[..],
        &bad_version[..],
        &[good.clone(), vec![0; 8]].concat()[..],
    ] {
        let mut fresh = Input::new(kind).unwrap();
        fresh.handle().key(2, true).unwrap();
        let kept = pending(&fresh);
        assert!(fresh.restore_state(bad).is_err(), "{bad:?}");
        assert_eq!(pending(&fresh), kept, "a refused state changes nothing");
    }
}
