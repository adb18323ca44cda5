//! The human-readable table.

use std::fmt::Write;

use crate::metrics::Results;

fn cell(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

/// Renders the results as a table with notes.
pub fn table(r: &Results) -> String {
    let mut s = String::new();
    let qemu = match &r.qemu {
        Some(q) => {
            let checks: Vec<String> = q
                .machines
                .iter()
                .map(|m| {
                    let mut c = format!(
                        "-M {}: boots={} pci={} acpi-poweroff={}",
                        m.machine, m.boots, m.pci, m.poweroff
                    );
                    if !m.detail.is_empty() {
                        c.push_str(&format!(" ({})", m.detail));
                    }
                    c
                })
                .collect();
            format!(
                "{}\n             {}",
                q.version,
                checks.join("\n             ")
            )
        }
        None => format!(
            "not measured: {}",
            r.no_qemu_reason.as_deref().unwrap_or("unknown reason")
        ),
    };
    if r.metrics
        .iter()
        .all(|m| m.samples_pocketvisor.is_empty() && m.errors.is_empty())
    {
        let _ = writeln!(s, "pocketvisor: not measured");
    } else {
        let _ = writeln!(s, "pocketvisor: {}", r.pocketvisor_bin.display());
    }
    let _ = writeln!(s, "qemu:        {qemu}");
    let _ = writeln!(s);
    let header = ["metric", "pocketvisor", "qemu (-M)", "ratio (pv/qemu)"];
    let rows: Vec<[String; 4]> = r
        .metrics
        .iter()
        .map(|m| {
            let better = if m.lower_is_better {
                "lower is better"
            } else {
                "higher is better"
            };
            [
                format!("{} ({}, {better})", m.name, m.unit),
                cell(m.pocketvisor),
                match (m.qemu, m.qemu_machine) {
                    (Some(_), Some(machine)) => format!("{} ({machine})", cell(m.qemu)),
                    _ => cell(m.qemu),
                },
                m.ratio
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [&str; 4]| -> String {
        format!(
            "| {:<w0$} | {:>w1$} | {:>w2$} | {:>w3$} |\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        )
    };
    s.push_str(&line(header));
    let _ = writeln!(
        s,
        "|{}|{}|{}|{}|",
        "-".repeat(widths[0] + 2),
        "-".repeat(widths[1] + 1) + ":",
        "-".repeat(widths[2] + 1) + ":",
        "-".repeat(widths[3] + 1) + ":"
    );
    for row in &rows {
        s.push_str(&line([&row[0], &row[1], &row[2], &row[3]]));
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "host read of the same file: {} MiB/s from the page cache, {} MiB/s with O_DIRECT",
        cell(r.host_io.cached_read_mib_s),
        cell(r.host_io.direct_read_mib_s)
    );
    for note in &r.notes {
        let _ = writeln!(s, "note: {note}");
    }
    for m in &r.metrics {
        for e in &m.errors {
            let _ = writeln!(s, "failed run ({}): {e}", m.key);
        }
    }
    s
}
