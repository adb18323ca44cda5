//! Where passphrases and identities come from: a file, the environment, or a prompt on the
//! terminal without echo.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use vault::{KdfParams, Passphrase, StaticSecret};
use zeroize::Zeroizing;

/// Environment variable holding the passphrase.
pub const PASSPHRASE_ENV: &str = "POCKETVISOR_PASSPHRASE";
/// Test-only knob: `POCKETVISOR_KDF=fast` makes `export` use argon2id parameters that give no
/// protection against guessing (8 KiB, 1 pass) so debug-build tests run fast. Never set it for
/// real files.
pub const KDF_ENV: &str = "POCKETVISOR_KDF";

/// The fewest characters a new (export) passphrase may have; import takes any.
pub const PASSPHRASE_MIN: usize = 12;

/// Refuses a passphrase for a new file that is shorter than [`PASSPHRASE_MIN`].
pub fn check_new_passphrase(p: &str) -> Result<()> {
    let n = p.chars().count();
    if n < PASSPHRASE_MIN {
        bail!(
            "the passphrase has {n} characters; a new portable file needs at least \
             {PASSPHRASE_MIN} (a few words are easy to type and hard to guess)"
        );
    }
    Ok(())
}

/// The passphrase options shared by `export` and `import`.
#[derive(Args, Debug, Clone)]
pub struct PassphraseArgs {
    /// Read the passphrase from the first line of FILE [default: $POCKETVISOR_PASSPHRASE, else a
    /// prompt on the terminal].
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

impl PassphraseArgs {
    /// The passphrase for a new file given by `--passphrase-file` or the environment, if
    /// any: at least [`PASSPHRASE_MIN`] characters.
    pub fn given_new(&self) -> Result<Option<Passphrase>> {
        self.given_for(true)
    }

    /// The passphrase given by `--passphrase-file` or the environment, if any (checked for a
    /// `new` file).
    fn given_for(&self, new: bool) -> Result<Option<Passphrase>> {
        if let Some(f) = &self.passphrase_file {
            return read_passphrase_file(f, new).map(Some);
        }
        match std::env::var(PASSPHRASE_ENV) {
            Ok(v) if !v.is_empty() => {
                let v = Zeroizing::new(v);
                if new {
                    check_new_passphrase(&v).with_context(|| format!("${PASSPHRASE_ENV}"))?;
                }
                Ok(Some(Passphrase::new(v.to_string())))
            }
            _ => Ok(None),
        }
    }

    /// The given passphrase, else one typed at the terminal (twice if `confirm`, for a new
    /// file, which also needs at least [`PASSPHRASE_MIN`] characters).
    pub fn get_or_prompt(&self, confirm: bool) -> Result<Passphrase> {
        if let Some(p) = self.given_for(confirm)? {
            return Ok(p);
        }
        let mut first = prompt("Passphrase: ").with_context(|| {
            format!("no passphrase: give --passphrase-file FILE or set {PASSPHRASE_ENV}")
        })?;
        if first.is_empty() {
            bail!("the passphrase is empty");
        }
        if confirm {
            check_new_passphrase(&first)?;
            let again = prompt("Passphrase again: ")?;
            if *again != *first {
                bail!("the passphrases differ");
            }
        }
        // Moves the buffer (no copy) into the Passphrase, which zeroizes it when dropped.
        Ok(Passphrase::new(std::mem::take(&mut *first)))
    }
}

/// Reads the first line of `path` (without its line end) as a passphrase.
/// A passphrase for a new file (`new`) needs at least [`PASSPHRASE_MIN`] characters.
fn read_passphrase_file(path: &Path, new: bool) -> Result<Passphrase> {
    let mut text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the passphrase file {}", path.display()))?;
    let end = text.find(['\n', '\r']).unwrap_or(text.len());
    // Truncating in place keeps the one buffer, which Passphrase zeroizes when dropped.
    text.truncate(end);
    if text.is_empty() {
        bail!("the passphrase file {} is empty", path.display());
    }
    if new {
        check_new_passphrase(&text)
            .with_context(|| format!("the passphrase file {}", path.display()))?;
    }
    Ok(Passphrase::new(text))
}

/// Restores the terminal's settings when dropped.
struct EchoOff<'a> {
    tty: &'a File,
    saved: libc::termios,
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the termios struct we own; the fd is open for our lifetime.
        unsafe { libc::tcsetattr(self.tty.as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}

/// Asks for a line on the controlling terminal with echo turned off.
pub(crate) fn prompt(message: &str) -> Result<Zeroizing<String>> {
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .context("there is no terminal to ask for the passphrase")?;
    // SAFETY: termios is plain data; an all-zero value is valid and is overwritten below.
    let mut term: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes into the termios struct we own; the fd is open.
    if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut term) } != 0 {
        bail!("there is no terminal to ask for the passphrase");
    }
    let guard = EchoOff {
        tty: &tty,
        saved: term,
    };
    term.c_lflag &= !libc::ECHO;
    term.c_lflag |= libc::ECHONL;
    // SAFETY: tcsetattr reads the termios struct we own; the fd is open.
    if unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &term) } != 0 {
        bail!("cannot turn off echo on the terminal");
    }
    (&tty)
        .write_all(message.as_bytes())
        .context("cannot write to the terminal")?;
    let mut line = Zeroizing::new(String::new());
    BufReader::new(&tty)
        .read_line(&mut line)
        .context("cannot read from the terminal")?;
    drop(guard);
    let end = line.find(['\n', '\r']).unwrap_or(line.len());
    line.truncate(end);
    Ok(line)
}

/// The argon2id parameters for new passphrase slots ([`KDF_ENV`] may select test parameters).
pub fn kdf_params() -> Result<KdfParams> {
    match std::env::var(KDF_ENV).as_deref() {
        Err(_) | Ok("") | Ok("default") => Ok(KdfParams::DEFAULT),
        Ok("fast") => {
            eprintln!(
                "pocketvisor: warning: {KDF_ENV}=fast: the passphrase slot uses insecure \
                 test-only argon2 parameters"
            );
            Ok(KdfParams::INSECURE_FAST)
        }
        Ok(other) => bail!("{KDF_ENV}={other:?}: the only values are `default` and `fast`"),
    }
}

/// Environment variable that sets how many threads compress/seal or open/decompress chunks.
pub const THREADS_ENV: &str = "POCKETVISOR_THREADS";

/// Worker threads of an export or import: [`THREADS_ENV`] (0 = the main thread only), else
/// one per core (at most 4).
pub fn threads() -> Result<usize> {
    match std::env::var(THREADS_ENV).as_deref() {
        Err(_) | Ok("") => Ok(vault::default_threads()),
        Ok(n) => match n.parse::<usize>() {
            Ok(n) if n <= 64 => Ok(n),
            _ => bail!("{THREADS_ENV}={n:?}: give a number of threads from 0 to 64"),
        },
    }
}

/// Reads an identity file written by `pocketvisor keygen`: the first line that is neither
/// blank nor a `#` comment is the `pvp-secret-...` key.
pub fn read_identity(path: &Path) -> Result<StaticSecret> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the identity file {}", path.display()))?,
    );
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .with_context(|| format!("the identity file {} holds no key", path.display()))?;
    vault::decode_secret(line).with_context(|| format!("identity file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_passphrase_has_a_minimum_length() {
        assert!(super::check_new_passphrase("short").is_err());
        assert!(
            super::check_new_passphrase("élève-élève").is_err(),
            "11 characters"
        );
        assert!(super::check_new_passphrase("correct horse").is_ok());
    }

    #[test]
    fn passphrase_file_first_line_and_identity_file() {
        let dir = std::env::temp_dir().join(format!("pv-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pass");
        std::fs::write(&f, "correct horse\r\nsecond line\n").unwrap();
        let args = PassphraseArgs {
            passphrase_file: Some(f.clone()),
        };
        let p = args.given_for(false).unwrap().unwrap();
        assert_eq!(format!("{p:?}"), "Passphrase(<redacted>)");
        // Only the first line counts: a slot made from the file opens with the literal.
        let data = dir.join("data");
        std::fs::write(&data, b"x").unwrap();
        let out = dir.join("t.pvp");
        let entry = vault::EntrySource {
            name: "data".into(),
            kind: vault::EntryKind::Other,
            path: data,
        };
        let key = vault::KeySpec::Passphrase {
            passphrase: p,
            params: KdfParams::INSECURE_FAST,
        };
        let m = vault::Manifest::new("t", serde_json::json!({}), None);
        vault::export(&out, m, &[entry], &[key], &mut |_| {}).unwrap();
        let unlock = vault::Unlock::Passphrase(Passphrase::new("correct horse"));
        assert_eq!(vault::inspect(&out, &unlock).unwrap().name, "t");
        std::fs::write(&f, "\n").unwrap();
        assert!(args.given_for(false).is_err());

        let (secret, _) = vault::generate_identity();
        let id = dir.join("id.key");
        let text = format!("# a comment\n\n{}\n", &*vault::encode_secret(&secret));
        std::fs::write(&id, text).unwrap();
        assert_eq!(read_identity(&id).unwrap().to_bytes(), secret.to_bytes());
        std::fs::write(&id, "# nothing\n").unwrap();
        assert!(read_identity(&id).is_err());
        std::fs::write(&id, "pvp-public-00\n").unwrap();
        assert!(read_identity(&id).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
