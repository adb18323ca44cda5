//! `pocketvisor handset`: the device daemon.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use handset::mdm_link::MdmOptions;

/// Run the handset daemon: profiles, their VMM processes, foreground switching, REST API.
#[derive(Args, Debug)]
#[command(after_help = "\
The daemon keeps its state in DIR (profiles, disks, SQLite database) and serves its REST API
on DIR/handset.sock (HTTP over a unix socket; see docs/api/handset.openapi.yaml). Use
`pocketvisor profile ...` to talk to it. Only one daemon runs per state directory.

It starts one jailed VMM process (`pocketvisor vmm`) per started profile, restarts crashed
ones per their restart policy, and on SIGTERM or SIGINT suspends to disk every running profile
whose spec says on_shutdown = \"suspend\" (the templates do) and stops the others before
exiting. When it starts, it starts (or resumes) the profiles with autostart = true. Started
again after a crash, it adopts the VMMs still running.

It also serves the browser phone (--http): a phone-shaped web page with the foreground
profile's live screen, a profile switcher and state badges; touch and keys reach the guest.
`pocketvisor profile view NAME` prints its address, with a token made at each daemon start.
It listens on loopback by default; a wider address needs HTTPS (--http-cert, --http-key).

With --mdm it is managed by the organisation's MDM server (docs/mdm.md): the first start
enrolls with --enroll TOKEN and --mdm-ca ca.pem (device key and certificate kept in DIR/mdm,
0600), later starts need neither. Only profiles created with `profile create --managed` are
visible to the MDM; `profile status` shows the link.

EXAMPLE:
  pocketvisor handset --state-dir /tmp/pv &
  pocketvisor profile --state-dir /tmp/pv create work --template work
  pocketvisor profile --state-dir /tmp/pv start work")]
pub struct HandsetArgs {
    /// State directory [default: $POCKETVISOR_STATE_DIR, else /var/lib/pocketvisor].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The probe guest used by profiles with kernel = "probe" [default: found next to this
    /// binary or in guest/out/ of the source tree].
    #[arg(long, value_name = "PATH")]
    probe: Option<PathBuf>,
    /// Name of the cgroup under which each profile gets its group [default:
    /// pocketvisor-HASH, 8 hex digits of the state directory's path: each state directory
    /// has its own; `profile status` shows it].
    #[arg(long, value_name = "NAME")]
    cgroup_parent: Option<String>,
    /// Boot and restore VMMs with `pocketvisor run`/`restore` instead of jailed with
    /// `pocketvisor vmm` (namespaces, private root under DIR/jail, no privileges, seccomp).
    #[arg(long)]
    no_jail: bool,
    /// Trust this organisation policy key (a pvpol-public-... file) before starting, as
    /// `pocketvisor policy trust` does; a different key already trusted is refused.
    #[arg(long, value_name = "FILE")]
    org_key: Option<PathBuf>,
    /// Where the browser phone (a phone-shaped web page with the profiles' live screens)
    /// listens: IP:PORT, or `off`. An address that is not loopback needs --http-cert and
    /// --http-key (HTTPS) [default: 127.0.0.1:0, a loopback port the system picks].
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// The browser phone's TLS certificate chain (PEM), for HTTPS.
    #[arg(long, value_name = "FILE", requires = "http_key")]
    http_cert: Option<PathBuf>,
    /// The browser phone's TLS private key (PEM), for HTTPS.
    #[arg(long, value_name = "FILE", requires = "http_cert")]
    http_key: Option<PathBuf>,
    /// How often the frames a profile's network policy refused are written to the audit
    /// log, counted per rule (`network-drop` records) [default: 60].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    drop_audit_secs: Option<u64>,
    /// The organisation's MDM server, https://HOST:PORT (HOST as in its certificate): the
    /// handset enrolls with it once (--enroll) and then keeps a long poll open, acts on the
    /// commands it signed (policy, lock, unlock, wipe: managed profiles only) and sends
    /// compliance reports. Unreachable, the daemon keeps working and retries.
    #[arg(long, value_name = "URL")]
    mdm: Option<String>,
    /// The single-use enrollment token (`mdm enroll-token`), for the first start only; a
    /// handset already enrolled needs none.
    #[arg(long, value_name = "TOKEN", requires = "mdm")]
    enroll: Option<String>,
    /// The MDM server's CA certificate (its ca.pem), trusted for the enrollment.
    #[arg(long, value_name = "FILE", requires = "mdm")]
    mdm_ca: Option<PathBuf>,
}

/// The MDM link from `--mdm`, `--enroll` and `--mdm-ca`: a handset not yet enrolled needs
/// the token and the CA.
fn mdm_options(a: &HandsetArgs, state_dir: &handset::StateDir) -> Result<Option<MdmOptions>> {
    let Some(url) = &a.mdm else {
        return Ok(None);
    };
    let server = MdmOptions::server_from_url(url)?;
    let ca_pem = match &a.mdm_ca {
        Some(f) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("--mdm-ca {}", f.display()))?)
        }
        None => None,
    };
    let enrolled = handset::mdm_link::is_enrolled(state_dir);
    if !enrolled && (a.enroll.is_none() || ca_pem.is_none()) {
        anyhow::bail!(
            "--mdm {url}: this handset is not enrolled yet: give --enroll TOKEN (from `mdm \
             enroll-token`) and --mdm-ca (the server's ca.pem)"
        );
    }
    Ok(Some(MdmOptions {
        server,
        enroll_token: a.enroll.clone().map(zeroize::Zeroizing::new),
        ca_pem,
    }))
}

/// The browser phone's configuration from `--http`, `--http-cert` and `--http-key`.
fn phone_config(a: &HandsetArgs) -> Result<Option<handset::phone::PhoneConfig>> {
    let tls = match (&a.http_cert, &a.http_key) {
        (Some(cert), Some(key)) => Some(handset::phone::TlsFiles {
            cert: std::path::absolute(cert)?,
            key: std::path::absolute(key)?,
        }),
        _ => None,
    };
    let addr = match a.http.as_deref() {
        Some("off") => {
            if tls.is_some() {
                anyhow::bail!(
                    "--http off: no browser phone, so --http-cert/--http-key mean nothing"
                );
            }
            return Ok(None);
        }
        Some(text) => text.parse().with_context(|| {
            format!("--http {text}: not IP:PORT (for example 127.0.0.1:8080), nor off")
        })?,
        None => handset::phone::PhoneConfig::loopback().addr,
    };
    let cfg = handset::phone::PhoneConfig { addr, tls };
    cfg.check()?;
    Ok(Some(cfg))
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn main(a: HandsetArgs) -> Result<i32> {
    let phone = phone_config(&a)?;
    let state_dir = handset::StateDir::resolve(a.state_dir.as_deref())?;
    let mdm = mdm_options(&a, &state_dir)?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let probe = match a.probe {
        Some(p) if p.is_file() => Some(std::path::absolute(&p)?),
        Some(p) => anyhow::bail!("--probe {}: no such file", p.display()),
        None => handset::find_probe(&exe),
    };
    let cgroup_parent = a
        .cgroup_parent
        .unwrap_or_else(|| handset::cgroup::default_parent(state_dir.root()));
    if cgroup_parent.is_empty() || cgroup_parent.contains('/') || cgroup_parent.starts_with('.') {
        anyhow::bail!("--cgroup-parent must be one path component");
    }
    if let Some(file) = &a.org_key {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--org-key {}", file.display()))?;
        let key = policy::OrgPublicKey::decode(&text)
            .with_context(|| format!("--org-key {}", file.display()))?;
        handset::org_policy::trust(&state_dir, &key, false)?;
    }
    handset::run_blocking(handset::Options {
        state_dir,
        vmm_bin: exe,
        probe,
        cgroup_parent,
        jail: !a.no_jail,
        phone,
        drop_audit_every: a.drop_audit_secs.map_or(
            handset::net_drops::DEFAULT_EVERY,
            std::time::Duration::from_secs,
        ),
        mdm,
    })?;
    Ok(0)
}
