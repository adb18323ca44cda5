//! Threads on standby (`devices::threads::start_standby`), in a process of their own: the
//! pool is the process's, and other tests' threads would take from it.

use std::sync::mpsc::channel;

use devices::threads::{spawn, start_standby};

/// Where a body ran: the thread's name in Rust and the kernel's.
fn ran_on(name: &str) -> (Option<String>, String) {
    let (tx, rx) = channel();
    let t = spawn(name, move || {
        let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
        let _ = tx.send((
            std::thread::current().name().map(str::to_string),
            comm.trim().to_string(),
        ));
    })
    .unwrap();
    t.join().unwrap();
    rx.recv().unwrap()
}

#[test]
fn bodies_run_on_threads_on_standby_then_on_new_ones() {
    let guard = start_standby(2).unwrap();
    for _ in 0..2 {
        let (rust, kernel) = ran_on("vcpu0");
        assert_eq!(rust.as_deref(), Some("standby"));
        assert_eq!(kernel, "vcpu0");
    }
    // None left: a new thread.
    assert_eq!(ran_on("serial-log").0.as_deref(), Some("serial-log"));
    drop(guard);
    // Left unused, they end with their guard: the next body gets a new thread.
    drop(start_standby(3).unwrap());
    assert_eq!(ran_on("worker").0.as_deref(), Some("worker"));
}
