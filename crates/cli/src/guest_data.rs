//! `pocketvisor profile clipboard set|get` and `profile file push|pull`: the host's data
//! to and from one profile, through the daemon and the profile's in-guest agent.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use handset::channels::{valid_file_name, Transfer, FILE_NAME_MAX, MAX_CLIPBOARD, MAX_FILE};
use handset::client::Client;
use handset::daemon::clone_files::{CloneDirection, CloneFile};
use handset::host_channels::{ClipboardSet, FilePush, Pulled};

/// Reads at most `max` bytes of `path` (`-`: standard input), refusing anything longer.
fn read_bounded(path: &Path, max: usize, what: &str) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    if path == Path::new("-") {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut data)
            .context("cannot read standard input")?;
    } else {
        let f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        anyhow::ensure!(
            f.metadata()?.is_file(),
            "{} is not a regular file",
            path.display()
        );
        f.take(limit)
            .read_to_end(&mut data)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    anyhow::ensure!(
        data.len() <= max,
        "{} is larger than the {max} bytes a {what} may have",
        path.display()
    );
    Ok(data)
}

/// Checks an inbox file name before anything is sent.
fn check_remote(name: &str) -> Result<()> {
    anyhow::ensure!(
        valid_file_name(name),
        "{name:?} is no inbox file name: 1-{FILE_NAME_MAX} of A-Z, a-z, 0-9, '.', '_' and '-', \
         not starting with '.' nor containing '..' (the agent keeps files in one flat inbox)"
    );
    Ok(())
}

/// Decodes a pulled answer's data and checks it against the size and digest it claims.
fn pulled_data(p: &Pulled) -> Result<Vec<u8>> {
    let data = STANDARD
        .decode(&p.data_b64)
        .context("the daemon sent data that is not base64")?;
    anyhow::ensure!(
        data.len() as u64 == p.transfer.bytes
            && handset::channels::sha256_hex(&data) == p.transfer.sha256,
        "the daemon's data does not match its size and SHA-256"
    );
    Ok(data)
}

/// `profile clipboard set NAME TEXT|--file F`.
pub fn clipboard_set(
    c: &Client,
    json: bool,
    name: &str,
    text: Option<String>,
    file: Option<PathBuf>,
    mime: Option<String>,
) -> Result<()> {
    let data = match (text, file) {
        (Some(t), None) => t.into_bytes(),
        (None, Some(f)) => read_bounded(&f, MAX_CLIPBOARD, "clipboard")?,
        _ => anyhow::bail!("give the TEXT or --file FILE (- for standard input)"),
    };
    anyhow::ensure!(
        data.len() <= MAX_CLIPBOARD,
        "the clipboard may hold at most {MAX_CLIPBOARD} bytes, not {}",
        data.len()
    );
    let req = ClipboardSet {
        mime,
        data_b64: STANDARD.encode(&data),
    };
    let t: Transfer = c.call("PUT", &format!("/v1/profiles/{name}/clipboard"), Some(&req))?;
    crate::profile::print_transfer(&t, json)
}

/// `profile clipboard get NAME`: the content on standard output (or the answer as JSON).
pub fn clipboard_get(c: &Client, json: bool, name: &str) -> Result<()> {
    let none: Option<&()> = None;
    let p: Pulled = c.call("GET", &format!("/v1/profiles/{name}/clipboard"), none)?;
    let data = pulled_data(&p)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&data)
        .and_then(|()| out.flush())
        .context("cannot write to standard output")
}

/// `profile file push NAME LOCAL [REMOTE]`.
pub fn push(
    c: &Client,
    json: bool,
    name: &str,
    local: &Path,
    remote: Option<String>,
) -> Result<()> {
    let remote = match remote {
        Some(r) => r,
        None => local
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} names no file: give REMOTE", local.display()))?
            .to_string(),
    };
    check_remote(&remote)?;
    let data = read_bounded(local, MAX_FILE, "file")?;
    let req = FilePush {
        data_b64: STANDARD.encode(&data),
    };
    let t: Transfer = c.call(
        "PUT",
        &format!("/v1/profiles/{name}/files/{remote}"),
        Some(&req),
    )?;
    crate::profile::print_transfer(&t, json)
}

/// `profile file from-clone|to-clone NAME REMOTE [--as NEWNAME]`: the daemon moves the file
/// between the clone's inbox and NAME's, `direction` says which way.
pub fn with_clone(
    c: &Client,
    json: bool,
    name: String,
    remote: String,
    as_name: Option<String>,
    direction: CloneDirection,
) -> Result<()> {
    check_remote(&remote)?;
    if let Some(n) = &as_name {
        check_remote(n)?;
    }
    let req = CloneFile {
        name: remote,
        as_name,
        direction,
    };
    let t: Transfer = c.call(
        "POST",
        &format!("/v1/profiles/{name}/clone/files"),
        Some(&req),
    )?;
    crate::profile::print_transfer(&t, json)
}

/// `profile file pull NAME REMOTE [LOCAL]`: writes exactly LOCAL (or LOCAL/REMOTE when
/// LOCAL is a directory; ./REMOTE without LOCAL), never anything else.
pub fn pull(
    c: &Client,
    json: bool,
    name: &str,
    remote: &str,
    local: Option<PathBuf>,
    force: bool,
) -> Result<()> {
    check_remote(remote)?;
    let target = match local {
        None => PathBuf::from(remote),
        Some(l) if l.is_dir() => l.join(remote),
        Some(l) => l,
    };
    if !force && std::fs::symlink_metadata(&target).is_ok() {
        anyhow::bail!(
            "{} exists: give --force to replace it (or another LOCAL)",
            target.display()
        );
    }
    let none: Option<&()> = None;
    let p: Pulled = c.call("GET", &format!("/v1/profiles/{name}/files/{remote}"), none)?;
    let data = pulled_data(&p)?;
    write_file(&target, &data, force)?;
    let mut t = p.transfer;
    if json {
        outln!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        t.name = Some(format!("{remote} -> {}", target.display()));
        crate::profile::print_transfer(&t, false)?;
    }
    Ok(())
}

/// Writes `data` to `path` through a new temporary file beside it (created exclusively, so
/// no symlink is followed), fsynced, then renamed over `path` (`replace`) or linked to it
/// only if nothing is there yet. A symlink at `path` is replaced, never written through.
fn write_file(path: &Path, data: &[u8], replace: bool) -> Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.pull-tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| {
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        if replace {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
        } else {
            std::fs::hard_link(&tmp, path)
                .with_context(|| format!("cannot create {} (it may exist now)", path.display()))?;
            std::fs::remove_file(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch directory for one test.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("pv-guest-data-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir(&p).unwrap();
            Scratch(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_pull_writes_only_its_target() {
        let t = Scratch::new("pull");
        let secret = t.path().join("secret");
        std::fs::write(&secret, b"keep").unwrap();
        // A symlink at the target is replaced, not written through.
        let link = t.path().join("out.txt");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(
            write_file(&link, b"new", false).is_err(),
            "exists without --force"
        );
        write_file(&link, b"new", true).unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"keep");
        assert_eq!(std::fs::read(&link).unwrap(), b"new");
        assert!(!std::fs::symlink_metadata(&link).unwrap().is_symlink());
        let fresh = t.path().join("fresh.bin");
        write_file(&fresh, b"abc", false).unwrap();
        assert_eq!(std::fs::read(&fresh).unwrap(), b"abc");
        let names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "no temporary file is left: {names:?}");
    }

    #[test]
    fn remote_names_are_inbox_names() {
        assert!(check_remote("report.pdf").is_ok());
        for bad in ["../x", "a/b", ".hidden", "", "/etc/passwd"] {
            assert!(check_remote(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_are_bounded() {
        let t = Scratch::new("read");
        let f = t.path().join("f");
        std::fs::write(&f, [7u8; 10]).unwrap();
        assert_eq!(read_bounded(&f, 10, "file").unwrap().len(), 10);
        assert!(read_bounded(&f, 9, "file").is_err());
        assert!(read_bounded(t.path(), 9, "file").is_err());
    }
}
