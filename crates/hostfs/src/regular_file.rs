//! Opening host files that must be regular files (disk images, kernels, initrds) without
//! waiting on anything else: a FIFO or a device named by mistake or malice is refused with an
//! error instead of blocking the VMM (a FIFO) or passing for an empty file (`/dev/zero`).

use std::fs::{File, OpenOptions};
use std::io::{Error, ErrorKind};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` for reading (and writing if `write`) non-blocking, and refuses anything but a
/// regular file (after symlinks) with an `InvalidInput` error naming what it is.
pub fn open_regular(path: &Path, write: bool) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let t = file.metadata()?.file_type();
    if t.is_file() {
        return Ok(file);
    }
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    };
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!("it is {kind}, not a regular file"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_open_and_nothing_blocks() {
        let dir = std::env::temp_dir().join(format!("pv-regular-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (p, kind) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a device"),
            (dir.as_path(), "a directory"),
        ] {
            let e = open_regular(p, false).unwrap_err();
            assert!(e.to_string().contains(kind), "{}: {e}", p.display());
        }
        std::fs::write(dir.join("f"), b"x").unwrap();
        open_regular(&dir.join("f"), true).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
