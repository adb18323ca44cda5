//! `pocketvisor mdm ...`: the MDM server and its admin commands (docs/mdm.md).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mdm::client::Client;

/// Run the MDM server, or manage its devices as the admin.
#[derive(Args, Debug)]
#[command(after_help = "\
The server keeps its store (mdm.db), CA (ca-key.pem 0600, ca.pem) and command key in
--state-dir; devices enroll with a single-use token and then authenticate with the
certificate its CA issued. Admin commands use the bearer token in --token-file and trust
the server through its ca.pem.

EXAMPLE (server):
  pocketvisor mdm serve --state-dir /var/lib/mdm --listen 0.0.0.0:8443 --name mdm.example \\
      --admin-token-file /etc/mdm/admin.token
EXAMPLE (admin):
  pocketvisor mdm --server mdm.example:8443 --ca ca.pem --token-file admin.token enroll-token
  pocketvisor mdm --server mdm.example:8443 --ca ca.pem --token-file admin.token devices
  pocketvisor mdm --server mdm.example:8443 --ca ca.pem --token-file admin.token lock DEVICE")]
pub struct MdmArgs {
    /// The server, HOST:PORT (admin commands); HOST must be in its certificate.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    server: Option<String>,
    /// The server's CA certificate (its state dir's ca.pem).
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A file holding the admin bearer token.
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: MdmCmd,
}

#[derive(Subcommand, Debug)]
enum MdmCmd {
    /// Run the server until interrupted.
    Serve {
        /// Directory for the store, CA and command key (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// The store: a PostgreSQL URL for a fleet of servers over one database
        /// (`postgresql://USER@HOST/DB`, or `postgresql://USER@/DB?host=/run/postgresql` for a
        /// unix socket; not encrypted, so a socket or a private network). Default: SQLite in
        /// DIR/mdm.db. Migrations run at start.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// The --store URL read from FILE, which keeps a password out of the process list.
        #[arg(long, value_name = "FILE", conflicts_with = "store")]
        store_file: Option<PathBuf>,
        /// PostgreSQL connections the server keeps open (1 to 256).
        #[arg(long, value_name = "N", default_value_t = 8,
              value_parser = clap::value_parser!(u16).range(1..=256))]
        store_connections: u16,
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Names (DNS or IP) the server's certificate carries; repeatable.
        #[arg(long = "name", value_name = "NAME", default_value = "localhost")]
        names: Vec<String>,
        /// A file holding the admin bearer token (at least 16 characters).
        #[arg(long, value_name = "FILE")]
        admin_token_file: PathBuf,
        /// Longest a device's poll is held open, seconds.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        long_poll: u64,
        /// Append every request received (method, path, client certificate, body) to FILE
        /// as JSON lines, created 0600: what devices disclose, for audits and debugging.
        /// It holds tokens and policies: keep it with the state dir.
        #[arg(long, value_name = "FILE")]
        request_log: Option<PathBuf>,
    },
    /// Create a single-use enrollment token (printed once; the server keeps only its hash).
    EnrollToken {
        /// Seconds it stays valid.
        #[arg(long, value_name = "SECS", default_value_t = 86400)]
        ttl: i64,
    },
    /// List enrolled devices with their latest compliance report.
    Devices,
    /// Queue a signed policy (from `policy sign`) for a device.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Queue a lock command for a device: its managed profiles pause until unlocked.
    Lock {
        device: String,
        /// Only this managed profile [default: every managed profile of the device].
        #[arg(long, value_name = "NAME")]
        profile: Option<String>,
    },
    /// Queue an unlock command for a device.
    Unlock {
        device: String,
        /// Only this managed profile [default: every managed profile of the device].
        #[arg(long, value_name = "NAME")]
        profile: Option<String>,
    },
    /// Queue a wipe command for a device: its managed profiles are crypto-erased and deleted,
    /// and the device answers with a signed receipt.
    Wipe {
        device: String,
        /// Only this managed profile [default: every managed profile of the device].
        #[arg(long, value_name = "NAME")]
        profile: Option<String>,
    },
    /// Revoke a device: its certificate is refused from now on.
    Revoke { device: String },
    /// Print the server's audit log.
    Audit,
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Queue the signed policy FILE for DEVICE.
    Push { device: String, file: PathBuf },
}

/// The body of a lock, unlock or wipe: empty for every managed profile, else the one named
/// (the device refuses a name it does not manage).
fn aim(profile: Option<String>) -> String {
    profile.map_or_else(String::new, |p| {
        serde_json::json!({ "profile": p }).to_string()
    })
}

fn read_secret(path: &PathBuf) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let token = text.trim().to_owned();
    if token.len() < 16 {
        bail!(
            "{}: the token must be at least 16 characters",
            path.display()
        );
    }
    Ok(token)
}

/// Runs `pocketvisor mdm ...`.
pub fn main(args: MdmArgs) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: MdmArgs) -> Result<i32> {
    if let MdmCmd::Serve {
        state_dir,
        store,
        store_file,
        store_connections,
        listen,
        names,
        admin_token_file,
        long_poll,
        request_log,
    } = &args.cmd
    {
        let log = match request_log {
            Some(p) => Some(
                mdm::request_log::RequestLog::open(p)
                    .with_context(|| format!("--request-log {}", p.display()))?,
            ),
            None => None,
        };
        let url = match (store, store_file) {
            (Some(url), _) => Some(url.clone()),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .with_context(|| format!("--store-file {}", file.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let store = StoreSpec {
            url: url.as_deref(),
            connections: usize::from(*store_connections),
        };
        return serve(
            state_dir,
            store,
            *listen,
            names,
            admin_token_file,
            *long_poll,
            log,
        )
        .await;
    }
    let (Some(server), Some(ca), Some(token_file)) = (&args.server, &args.ca, &args.token_file)
    else {
        bail!("admin commands need --server, --ca and --token-file");
    };
    let token = read_secret(token_file)?;
    let ca_pem =
        std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
    let host = server.rsplit_once(':').map_or(server.as_str(), |(h, _)| h);
    let addr = server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server}: no address"))?;
    let client = Client::new(addr, host, &ca_pem, None, Duration::from_secs(60))?;
    let call = |method: &'static str, path: String, body: Option<serde_json::Value>| {
        let client = client.clone();
        let token = token.clone();
        async move {
            let body = body.map(|b| b.to_string());
            let r = client
                .request(
                    method,
                    &path,
                    Some(&token),
                    body.as_deref().map(str::as_bytes),
                )
                .await?;
            if !(200..300).contains(&r.status) {
                let why = serde_json::from_slice::<serde_json::Value>(&r.body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
                bail!("the server refused ({}): {why}", r.status);
            }
            Ok::<_, anyhow::Error>(
                serde_json::from_slice::<serde_json::Value>(&r.body).unwrap_or_default(),
            )
        }
    };
    let queue = |device: String, kind: &'static str, body: String| {
        call(
            "POST",
            format!("/v1/admin/devices/{device}/commands"),
            Some(serde_json::json!({"kind": kind, "body": body})),
        )
    };
    let out = match args.cmd {
        MdmCmd::Serve { .. } => unreachable!("handled above"),
        MdmCmd::EnrollToken { ttl } => {
            call(
                "POST",
                "/v1/admin/tokens".into(),
                Some(serde_json::json!({"ttl_secs": ttl})),
            )
            .await?
        }
        MdmCmd::Devices => call("GET", "/v1/admin/devices".into(), None).await?,
        MdmCmd::Audit => call("GET", "/v1/admin/audit".into(), None).await?,
        MdmCmd::Policy {
            cmd: PolicyCmd::Push { device, file },
        } => {
            use base64::Engine as _;
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            // The handset verifies the signature; here only the size (base64 must fit a body).
            if bytes.is_empty() || bytes.len() > 128 * 1024 {
                bail!("{}: a signed policy is 1 byte to 128 KiB", file.display());
            }
            queue(
                device,
                "policy",
                base64::engine::general_purpose::STANDARD.encode(bytes),
            )
            .await?
        }
        MdmCmd::Lock { device, profile } => queue(device, "lock", aim(profile)).await?,
        MdmCmd::Unlock { device, profile } => queue(device, "unlock", aim(profile)).await?,
        MdmCmd::Wipe { device, profile } => queue(device, "wipe", aim(profile)).await?,
        MdmCmd::Revoke { device } => {
            call("POST", format!("/v1/admin/devices/{device}/revoke"), None).await?
        }
    };
    if !out.is_null() {
        outln!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(0)
}

/// Which store `mdm serve` uses.
struct StoreSpec<'a> {
    /// A PostgreSQL URL, or None for SQLite in the state dir.
    url: Option<&'a str>,
    connections: usize,
}

async fn serve(
    state_dir: &PathBuf,
    store: StoreSpec<'_>,
    listen: SocketAddr,
    names: &[String],
    token_file: &PathBuf,
    long_poll: u64,
    log: Option<mdm::request_log::RequestLog>,
) -> Result<i32> {
    let token = read_secret(token_file)?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
    }
    let store: Arc<dyn mdm::Store> = match store.url {
        Some(url) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                bail!("--store takes a postgresql:// URL (SQLite is the default, in --state-dir)");
            }
            Arc::new(
                mdm::PostgresStore::connect(url, store.connections)
                    .context("connecting to the PostgreSQL store")?,
            )
        }
        None => Arc::new(mdm::SqliteStore::open(&state_dir.join("mdm.db"))?),
    };
    let server = mdm::server::Mdm::new(state_dir, store, &token, Duration::from_secs(long_poll))?;
    let config = server.tls_config(names)?;
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let bound = tcp.local_addr()?;
    let listener = mdm::server::TlsListener::new(tcp, config)?;
    outln!(
        "mdm: listening on {bound}; CA {}",
        state_dir.join("ca.pem").display()
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    mdm::server::serve_logged(server, listener, shutdown, log).await?;
    Ok(0)
}
