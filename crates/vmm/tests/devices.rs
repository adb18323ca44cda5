//! The device manager with a real guest: requests addressed by device id, snapshot sections
//! keyed by id, and snapshots written before devices had ids still restoring.

mod common;

use std::path::Path;

use vmm::device_manager::DeviceRequestError;
use vmm::snapshot::format::{self, SectionKind, Writer};
use vmm::snapshot::STATE_FILE;
use vmm::{Request, RequestError, RestoreOverrides, RunOutcome, SerialConfig, Vm, VmConfig};

use common::{probe, wait_for, Running, Scratch};

fn counter_vm(probe: &Path, log: &Path) -> VmConfig {
    let mut cfg = VmConfig::new(probe.to_path_buf());
    cfg.cmdline = "pv.mode=counter pv.counter.ms=20".into();
    cfg.memory_mib = 64;
    cfg.rng = true;
    cfg.balloon = true;
    cfg.serial = SerialConfig::File(log.to_path_buf());
    cfg
}

fn device(id: &str, request: serde_json::Value) -> Request {
    Request::Device {
        id: id.into(),
        request,
    }
}

/// Rewrites a snapshot's `state.bin` the way snapshots were written before devices had ids:
/// one `virtio-pci` section per device, by position.
fn make_positional(dir: &Path) {
    let path = dir.join(STATE_FILE);
    let sections = format::read(&std::fs::read(&path).unwrap()).unwrap();
    let mut w = Writer::new();
    let mut index = 0;
    for s in sections {
        if s.kind == SectionKind::Device {
            let mut v: serde_json::Value = serde_json::from_slice(&s.payload).unwrap();
            let state = v["state"].take();
            let old = serde_json::json!({ "index": index, "state": state });
            w.add(SectionKind::VirtioPci, &old).unwrap();
            index += 1;
        } else {
            w.add_raw(s.kind as u32, s.kind.version(), &s.payload);
        }
    }
    assert_eq!(index, 2, "rng and balloon");
    std::fs::write(&path, w.finish()).unwrap();
}

#[test]
fn requests_by_device_id_and_snapshots_keyed_by_id() {
    let Some(probe) = probe("requests_by_device_id_and_snapshots_keyed_by_id") else {
        return;
    };
    let s = Scratch::new("devices");
    let (log_a, log_b, log_c) = (s.path("a.log"), s.path("b.log"), s.path("c.log"));
    let a = Running::start(Vm::new(&counter_vm(&probe, &log_a)).unwrap());
    wait_for(&log_a, "PROBE counter 2\n");

    let ctl = &a.control;
    let set = serde_json::json!({"op": "set_target", "target_mib": 8});
    let answer = ctl.call(device("balloon", set.clone())).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&answer).unwrap(),
        serde_json::json!({"target_mib": 8})
    );
    let info = ctl
        .call(device("balloon", serde_json::json!({"op": "stats"})))
        .unwrap();
    assert!(info.contains("\"target_mib\":8"), "{info}");
    let e = ctl.call(device("disk0", set.clone())).unwrap_err();
    assert!(
        matches!(
            e,
            RequestError::Device(DeviceRequestError::UnknownDevice { .. })
        ),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(
        e.contains("no disk0 device") && e.contains("rng, balloon"),
        "{e}"
    );
    let e = ctl.call(device("rng", set)).unwrap_err().to_string();
    assert!(e.contains("takes no control requests"), "{e}");
    let e = ctl
        .call(device("balloon", serde_json::json!({"op": "inflate"})))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad request"), "{e}");
    for id in ["rng", "balloon"] {
        let counters: serde_json::Value = serde_json::from_str(
            &ctl.call(device(id, serde_json::json!({"op": "counters"})))
                .unwrap(),
        )
        .unwrap();
        for key in ["requests", "bytes", "errors", "interrupts"] {
            assert!(counters[key].is_u64(), "{id}: {counters}");
        }
        assert_eq!(counters["errors"], 0, "{id}: {counters}");
    }
    let stats: serde_json::Value =
        serde_json::from_str(&ctl.call(Request::Stats).unwrap()).unwrap();
    assert_eq!(stats["balloon"]["target_mib"], 8, "{stats}");

    let snap = s.path("snap");
    ctl.call(Request::Snapshot {
        dir: snap.clone(),
        resume: false,
    })
    .unwrap();
    let stopped_at = std::fs::read_to_string(&log_a).unwrap();
    assert_eq!(a.stop().unwrap(), RunOutcome::Stopped);

    // Sections by id.
    let sections = format::read(&std::fs::read(snap.join(STATE_FILE)).unwrap()).unwrap();
    let ids: Vec<String> = sections
        .iter()
        .filter(|s| s.kind == SectionKind::Device)
        .map(|s| {
            let v: serde_json::Value = serde_json::from_slice(&s.payload).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids, ["rng", "balloon"]);
    let next = stopped_at
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE counter "))
        .filter_map(|n| n.parse::<u64>().ok())
        .next_back()
        .unwrap()
        + 1;

    // The same snapshot rewritten with positional sections restores too, balloon target kept.
    let old = s.path("old");
    std::fs::create_dir_all(&old).unwrap();
    for f in std::fs::read_dir(&snap).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), old.join(f.file_name())).unwrap();
    }
    make_positional(&old);
    for (dir, log) in [(&snap, &log_b), (&old, &log_c)] {
        let o = RestoreOverrides {
            serial: Some(SerialConfig::File(log.clone())),
            ..Default::default()
        };
        let vm = Running::start(Vm::restore(dir, &o).unwrap());
        let text = wait_for(log, &format!("PROBE counter {}\n", next + 1));
        assert!(
            text.starts_with(&format!("PROBE counter {next}\n")),
            "{text}"
        );
        let stats = vm.control.call(Request::Stats).unwrap();
        assert!(stats.contains("\"target_mib\":8"), "{stats}");
        assert_eq!(vm.stop().unwrap(), RunOutcome::Stopped);
    }

    // A snapshot whose device set differs from the configuration's is refused.
    let mut cfg = counter_vm(&probe, &log_c);
    cfg.balloon = false;
    let state = std::fs::read(snap.join(STATE_FILE)).unwrap();
    let mut w = Writer::new();
    for sec in format::read(&state).unwrap() {
        let payload = if sec.kind == SectionKind::Config {
            serde_json::to_vec(&cfg).unwrap()
        } else {
            sec.payload
        };
        w.add_raw(sec.kind as u32, sec.kind.version(), &payload);
    }
    std::fs::write(snap.join(STATE_FILE), w.finish()).unwrap();
    let e = Vm::restore(&snap, &RestoreOverrides::default())
        .err()
        .expect("a snapshot with a device the configuration lacks was accepted");
    assert!(e.to_string().contains("balloon"), "{e}");
}
