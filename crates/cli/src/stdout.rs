//! Printing to standard output without panicking when the reader goes away.
//!
//! `outln!` panics when stdout is a closed pipe (`pocketvisor doctor | head -1`). A closed
//! reader only means nobody wants the rest of the text, so these helpers drop it quietly;
//! any other write error (a full disk) is reported on stderr once, the rest of the output is
//! dropped, and [`failed`] makes the command exit non-zero.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout failed: later output is dropped without retrying.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// Set when a write failed for a reason other than a closed reader.
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether output was lost for a reason other than a closed reader (the command then fails).
pub fn failed() -> bool {
    STDOUT_FAILED.load(Ordering::Relaxed)
}

/// Whether stdout is gone (a closed reader or a failed write): a command that follows
/// something forever stops then.
pub fn gone() -> bool {
    STDOUT_GONE.load(Ordering::Relaxed)
}

/// Writes formatted text to stdout; a closed pipe or other write error is not a panic.
pub fn write(args: fmt::Arguments<'_>) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        if e.kind() != io::ErrorKind::BrokenPipe {
            STDOUT_FAILED.store(true, Ordering::Relaxed);
            eprintln!("pocketvisor: warning: writing to stdout: {e}");
        }
    }
}

/// `outln!` that does not panic when stdout is closed (see the module doc).
macro_rules! outln {
    () => { $crate::stdout::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::stdout::write(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` that does not panic when stdout is closed (see the module doc).
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdout::write(format_args!($($arg)*)) };
}
