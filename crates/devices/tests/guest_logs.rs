//! Every log line a guest can trigger is rate limited: device code logs through
//! `guest_warn!`/`guest_debug!` (first 8 occurrences per call site, then every power of two),
//! and a plain `tracing` call is allowed only at the host-side sites listed here (each with
//! why a guest cannot repeat it at will). A new plain log call in device code fails this test
//! until it is rate limited or argued into the list.

use std::path::{Path, PathBuf};

/// (file under `src/`, text on the line, why the guest cannot trigger it at will).
const HOST_ONLY: &[(&str, &str, &str)] = &[
    (
        "virtio/input.rs",
        "cannot wake the virtio-input worker",
        "the host injects input events",
    ),
    (
        "virtio/balloon.rs",
        "cannot request statistics",
        "the host asks for balloon statistics",
    ),
    (
        "virtio/worker.rs",
        "cannot signal virtio worker to pause",
        "the host pauses",
    ),
    (
        "virtio/worker.rs",
        "cannot signal virtio worker to stop",
        "the host stops",
    ),
    (
        "virtio/worker.rs",
        "virtio worker thread panicked",
        "once per worker, at stop",
    ),
    (
        "virtio/worker.rs",
        "virtio worker epoll failed",
        "ends the worker",
    ),
    (
        "legacy/debugcon.rs",
        "tracing::debug!(target: \"firmware\"",
        "the firmware's log, capped at MAX_LINES lines per VM",
    ),
    (
        "virtio/net/mod.rs",
        "tracing::warn!(\"virtio-net: {report}\")",
        "the network policy's drop report, at most one per filter::REPORT_EVERY (10 s)",
    ),
    (
        "ratelimit.rs",
        "tracing::",
        "the rate-limited macros themselves",
    ),
];

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn device_code_logs_guest_triggered_events_only_rate_limited() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut plain = Vec::new();
    let mut limited = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        // Unit tests may log as they like.
        if rel.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (i, line) in code.lines().enumerate() {
            limited += line.matches("guest_warn!(").count() + line.matches("guest_debug!(").count();
            let is_plain = ["warn!(", "error!(", "info!(", "debug!(", "trace!("]
                .iter()
                .any(|m| line.contains(&format!("tracing::{m}")));
            if !is_plain {
                continue;
            }
            let allowed = HOST_ONLY
                .iter()
                .any(|(file, needle, _)| rel == *file && line.contains(needle));
            if !allowed {
                plain.push(format!("src/{rel}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        plain.is_empty(),
        "plain log calls in device code (use guest_warn!/guest_debug!, or list a host-only \
         site in HOST_ONLY with the reason):\n{}",
        plain.join("\n")
    );
    // The scan saw the device code (not an empty or moved tree).
    assert!(
        limited >= 30,
        "only {limited} rate-limited call sites found"
    );
}
