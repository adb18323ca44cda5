//! Progress output: a bar with bytes and rate on a terminal, JSON lines for scripts.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vault::Progress;

/// Least time between two JSON progress events.
const JSON_INTERVAL: Duration = Duration::from_millis(100);

enum Mode {
    Json {
        /// When and at which byte count the last event was printed.
        last: Option<(Instant, u64)>,
    },
    Bar(ProgressBar),
    Quiet,
}

/// Reports the progress of one export or import.
pub struct Reporter {
    mode: Mode,
    started: Instant,
    last: Progress,
}

impl Reporter {
    /// JSON events on stdout if `json`, else a bar on stderr if it is a terminal, else nothing.
    pub fn new(json: bool, label: &str) -> Self {
        let mode = if json {
            Mode::Json { last: None }
        } else if std::io::stderr().is_terminal() {
            // Drawn from the first report on, when the total is known.
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
            let style = ProgressStyle::with_template(
                "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label.to_string());
            Mode::Bar(bar)
        } else {
            Mode::Quiet
        };
        Reporter {
            mode,
            started: Instant::now(),
            last: Progress {
                bytes_done: 0,
                bytes_total: 0,
            },
        }
    }

    /// Records a progress report from the vault.
    pub fn update(&mut self, p: Progress) {
        self.last = p;
        match &mut self.mode {
            Mode::Json { last } => {
                let due = match *last {
                    None => true,
                    Some((_, n)) if n == p.bytes_done => false,
                    Some((t, _)) => t.elapsed() >= JSON_INTERVAL || p.bytes_done == p.bytes_total,
                };
                if due {
                    *last = Some((Instant::now(), p.bytes_done));
                    json_line(&serde_json::json!({
                        "event": "progress",
                        "bytes_done": p.bytes_done,
                        "bytes_total": p.bytes_total,
                    }));
                }
            }
            Mode::Bar(bar) => {
                if bar.is_hidden() {
                    bar.set_draw_target(ProgressDrawTarget::stderr());
                }
                bar.set_length(p.bytes_total);
                bar.set_position(p.bytes_done);
            }
            Mode::Quiet => {}
        }
    }

    /// Time since the reporter was made.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Ends the bar; in JSON mode prints the final `done` event with `fields` added.
    pub fn done(self, fields: serde_json::Value) {
        match self.mode {
            Mode::Json { .. } => {
                let mut event = serde_json::json!({
                    "event": "done",
                    "bytes_done": self.last.bytes_done,
                    "bytes_total": self.last.bytes_total,
                    "seconds": self.started.elapsed().as_secs_f64(),
                });
                if let (Some(map), serde_json::Value::Object(extra)) =
                    (event.as_object_mut(), fields)
                {
                    map.extend(extra);
                }
                json_line(&event);
            }
            Mode::Bar(bar) => bar.finish_and_clear(),
            Mode::Quiet => {}
        }
    }

    /// Removes the bar after a failure.
    pub fn abandon(self) {
        if let Mode::Bar(bar) = self.mode {
            bar.finish_and_clear();
        }
    }
}

/// Prints one JSON event line on stdout and flushes it.
pub fn json_line(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// `n` bytes as MiB with one decimal.
pub fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// Throughput of `n` bytes in `t`, in MB/s (10^6 bytes).
pub fn rate(n: u64, t: Duration) -> f64 {
    let s = t.as_secs_f64();
    if s > 0.0 {
        n as f64 / 1e6 / s
    } else {
        0.0
    }
}
