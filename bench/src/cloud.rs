//! A cloud host on loopback for the issue-13 benches (`replica`, `cloud_return`): the
//! certificates, the TLS flags and a running `pocketvisor cloud serve`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;

use crate::compare;
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
