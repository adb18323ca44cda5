//! A cloud host on loopback for the issue-13 benches (`replica`, `cloud_return`): the
//! certificates, the TLS flags and a running `pocketvisor cloud serve`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;

use crate::compare::{self, wait_until};
use crate::util::Proc;

/// A CA, the cloud host's (`cloud`, for 127.0.0.1) and a device's (`phone`) certificates and
/// keys, and a migration key (`cloud.mkey`), in `dir`.
pub fn certificates(dir: &Path) -> Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key)?;
    for (who, name) in [("cloud", "127.0.0.1"), ("phone", "phone.example")] {
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec![name.to_string()])?.signed_by(&key, &ca, &ca_key)?;
        std::fs::write(dir.join(format!("{who}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{who}.key")), key.serialize_pem())?;
        std::fs::write(dir.join(format!("{who}-ca.pem")), ca.pem())?;
    }
    std::fs::write(dir.join("cloud.mkey"), "5a".repeat(32) + "\n")?;
    Ok(())
}

/// `--key`, `--tls-cert`, `--tls-key`, `--tls-ca` for `who` (`cloud` or `phone`) of the
/// files [`certificates`] wrote in `dir`.
pub fn tls(dir: &Path, who: &str) -> Vec<String> {
    let f = |s: &str| dir.join(format!("{who}{s}")).display().to_string();
    vec![
        "--key".into(),
        dir.join("cloud.mkey").display().to_string(),
        "--tls-cert".into(),
        f(".pem"),
        "--tls-key".into(),
        f(".key"),
        "--tls-ca".into(),
        f("-ca.pem"),
    ]
}

/// `bin cloud serve` on a free loopback port with its state in `dir/state` and the host's
/// identity from `certs`, its stderr in `dir/serve.stderr`; the process and its address.
pub fn serve(bin: &Path, certs: &Path, dir: &Path, limit: Duration) -> Result<(Proc, String)> {
    let serve_err = dir.join("serve.stderr");
    let serve = Proc(
        Command::new(bin)
            .args(["cloud", "serve", "--listen", "127.0.0.1:0", "--state"])
            .arg(dir.join("state"))
            .args(tls(certs, "cloud"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&serve_err)?)
            .spawn()?,
    );
    let addr =
        compare::listen_address(&serve_err, "cloud host listening on ", limit, "cloud serve")?;
    Ok((serve, addr))
}

/// The two probe guests of the cloud benches, with data in their RAM, as (name, command line):
/// `idle` (`data_mb` MiB written once, then only read back) and `dirtying` (`dirty_mb` MiB
/// rewritten every 50 ms), `words` pattern words per 4 KiB page.
pub fn mem_guests(data_mb: u64, dirty_mb: u64, words: u64) -> [(&'static str, String); 2] {
    [
        (
            "idle",
            format!(
                "pv.mode=mem pv.mem.mb={data_mb} pv.mem.words={words} pv.mem.gap=1000 \
                 pv.mem.tick=100000"
            ),
        ),
        (
            "dirtying",
            format!(
                "pv.mode=mem pv.mem.refill=1 pv.mem.mb={dirty_mb} pv.mem.words={words} \
                 pv.mem.gap=50 pv.mem.tick=100000"
            ),
        ),
    ]
}

/// Waits until the guest logging to `log` (one of [`mem_guests`]) has its data in RAM: two
/// memory passes checked.
pub fn wait_for_data(log: &Path, limit: Duration) -> Result<()> {
    wait_until(log, limit, "two memory passes", |l| {
        l.iter()
            .filter(|l| l.starts_with("PROBE mem pass n=") && l.contains(" ok "))
            .count()
            >= 2
    })
}
