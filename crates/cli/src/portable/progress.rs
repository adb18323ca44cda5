//! Progress output: a bar with bytes and rate on a terminal, JSON lines for scripts.
//!
//! The key derivation (argon2id for a passphrase, about half a second) comes first and moves
//! no bytes: it is shown as its own step ("deriving key", a spinner; a `deriving_key` JSON
//! event) so the bar's rate and ETA only count the data, and its time is reported apart
//! (`key_seconds` and `data_seconds` in the `done` event).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vault::{Phase, Progress};

/// Least time between two JSON progress events.
const JSON_INTERVAL: Duration = Duration::from_millis(100);
/// Redraw interval of the spinner while the key is derived.
const SPINNER_TICK: Duration = Duration::from_millis(100);

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
    label: String,
    started: Instant,
    /// When the key derivation started, when the data started, when the vault call returned.
    key_started: Option<Instant>,
    key_ended: Option<Instant>,
    data_started: Option<Instant>,
    ended: Option<Instant>,
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
            bar.set_style(bar_style());
            bar.set_message(label.to_string());
            Mode::Bar(bar)
        } else {
            Mode::Quiet
        };
        Reporter {
            mode,
            label: label.to_string(),
            started: Instant::now(),
            key_started: None,
            key_ended: None,
            data_started: None,
            ended: None,
            last: Progress {
                phase: Phase::DerivingKey,
                bytes_done: 0,
                bytes_total: 0,
            },
        }
    }

    /// Records a progress report from the vault.
    pub fn update(&mut self, p: Progress) {
        self.last = p;
        if p.phase == Phase::DerivingKey {
            self.deriving_key();
            return;
        }
        if self.data_started.is_none() {
            self.data_starts();
        }
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

    /// The key derivation starts: a spinner, or a `deriving_key` event.
    fn deriving_key(&mut self) {
        self.key_started = Some(Instant::now());
        match &self.mode {
            Mode::Json { .. } => json_line(&serde_json::json!({"event": "deriving_key"})),
            Mode::Bar(bar) => {
                let style = ProgressStyle::with_template("{msg} {spinner} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner());
                bar.set_style(style);
                bar.set_message(format!("{}: deriving key", self.label));
                bar.set_draw_target(ProgressDrawTarget::stderr());
                bar.enable_steady_tick(SPINNER_TICK);
            }
            Mode::Quiet => {}
        }
    }

    /// The key is derived before the data starts (export derives it before suspending the
    /// guest): its time ends here, and a `key_derived` event says so.
    pub fn key_derived(&mut self) {
        self.key_ended = Some(Instant::now());
        match &self.mode {
            Mode::Json { .. } => json_line(&serde_json::json!({"event": "key_derived"})),
            Mode::Bar(bar) => bar.set_message(format!("{}: key derived", self.label)),
            Mode::Quiet => {}
        }
    }

    /// The first data moves: the spinner becomes the bar, whose rate and ETA start now.
    fn data_starts(&mut self) {
        self.data_started = Some(Instant::now());
        if let Mode::Bar(bar) = &self.mode {
            bar.disable_steady_tick();
            bar.set_style(bar_style());
            bar.set_message(self.label.clone());
            bar.reset_eta();
            bar.reset_elapsed();
        }
    }

    /// Marks the end of the vault's work (the data phase ends here).
    pub fn finished(&mut self) {
        self.ended.get_or_insert_with(Instant::now);
    }

    /// Time since the reporter was made.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Seconds the key derivation took, if it was reported.
    pub fn key_seconds(&self) -> Option<f64> {
        let start = self.key_started?;
        let end = self.key_ended.or(self.data_started).or(self.ended)?;
        Some(end.duration_since(start).as_secs_f64())
    }

    /// Seconds from the first data to the end of the vault's work.
    fn data_seconds(&self) -> Option<f64> {
        let start = self.data_started?;
        let end = self.ended.unwrap_or_else(Instant::now);
        Some(end.duration_since(start).as_secs_f64())
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
                    "key_seconds": self.key_seconds(),
                    "data_seconds": self.data_seconds(),
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

/// The bar of the data phase: bytes, rate and ETA.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
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
