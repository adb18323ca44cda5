//! `pocketvisor keygen`: a new X25519 identity for `export --recipient` / `import --identity`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

/// Write a new identity (X25519 secret key) and print its public key.
#[derive(Args, Debug)]
#[command(after_help = "\
The identity file is created with mode 0600 and never overwritten. The public key printed on
stdout (pvp-public-...) is what `pocketvisor export --recipient` takes; keep the identity file
(e.g. the organization's recovery key) to open such files with `pocketvisor import --identity`.

EXAMPLE:
  pocketvisor keygen -o org.key > org.pub
  pocketvisor export work -o work.pvp --recipient \"$(cat org.pub)\"
  pocketvisor import work.pvp --identity org.key")]
pub struct KeygenArgs {
    /// The identity file to create.
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
}

/// Runs `pocketvisor keygen`.
pub fn main(a: KeygenArgs) -> Result<i32> {
    let (secret, public) = vault::generate_identity();
    let public_text = vault::encode_public(&public);
    let secret_text = vault::encode_secret(&secret);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.output)
        .with_context(|| format!("cannot create {}", a.output.display()))?;
    let body = zeroize::Zeroizing::new(format!(
        "# pocketvisor identity (X25519 secret key): keep it secret.\n\
         # public key: {public_text}\n{}\n",
        &*secret_text
    ));
    if let Err(e) = file
        .write_all(body.as_bytes())
        .and_then(|()| file.sync_all())
    {
        let _ = std::fs::remove_file(&a.output);
        return Err(e).with_context(|| format!("cannot write {}", a.output.display()));
    }
    eprintln!(
        "pocketvisor: wrote the identity to {} (mode 0600); its public key:",
        a.output.display()
    );
    outln!("{public_text}");
    Ok(0)
}
