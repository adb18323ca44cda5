//! `mdm`: the MDM server on SQLite and on PostgreSQL side by side, in one run: enrollments per
//! second, and how long one policy push takes to reach every one of N (1,000) long-polling
//! devices.
//!
//! ```text
//! cargo run -p bench --release --bin mdm -- [--runs 3] [--devices 1000] [--json] [--work DIR]
//! ```
//!
//! Each run, for each store (their order alternates from run to run), starts a fresh server in
//! this process (`mdm::server` on a runtime of its own, 2 threads) on a fresh store: SQLite in
//! the run's directory, or a new database in a PostgreSQL scratch cluster started once for the
//! bench (`mdm::store::pg_scratch`: Debian's `postgresql` must be installed; fsync on, as
//! SQLite's commits wait for the disk too; both under the same temp dir) with the 8
//! connections `mdm serve` keeps by default. The devices are `mdm::sim`'s (the load test's), on
//! a second runtime of 2 threads, over TLS on loopback:
//!
//! - **enroll**: N tokens are added to the store, then N devices enroll at once (each a fresh
//!   key, one TLS connection, a certificate issued); enrollments per second = N / the time until
//!   the last device holds its certificate.
//! - **push**: every device long-polls; once the server holds all N polls, the admin API queues
//!   one signed policy (a real `policy sign` envelope with 20 network rules, base64, as `mdm
//!   policy push` sends it) for each device, 16 admin requests in flight. *queued*: until the
//!   last admin request is answered; *reached*: until the last device holds its policy command
//!   with the server's valid signature (each poll answers as soon as its command is queued).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bench::compare::{exit_on_error, Common, Stat};
use bench::util::Args;
use mdm::server::{Mdm, TlsListener};
use mdm::sim::{SimDevice, Target};
use mdm::store::pg_scratch::ScratchCluster;
use mdm::{PostgresStore, SqliteStore, Store};

const TAG: &str = "mdm";
const USAGE: &str = "usage: mdm [--runs N] [--devices N] [--json] [--work DIR]";
const ADMIN: &str = "bench-admin-token-0123456789";
/// Admin requests in flight during a push.
const PUSH_PARALLEL: usize = 16;
/// What `mdm serve` keeps by default.
const PG_CONNECTIONS: usize = 8;
/// Bounds for one phase of one run (a debug build under load stays far below).
const PHASE_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Sqlite => "sqlite",
            Kind::Postgres => "postgresql",
        }
    }
}

/// One run's figures on one store.
#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    enroll_per_s: f64,
    push_queued_s: f64,
    push_reached_s: f64,
    enroll_retries: u32,
}

fn main() {
    exit_on_error(TAG, run());
}

fn run() -> Result<()> {
    let mut common = Common::new(3);
    let mut devices = 1000usize;
    let mut args = Args::new(std::env::args().skip(1), USAGE);
    while let Some(flag) = args.next_flag() {
        if flag == "--devices" {
            devices = args.parse("--devices")?;
        } else if !common.take(&flag, &mut args)? {
            return Err(args.unknown(&flag));
        }
    }
    ensure!(common.runs >= 1 && devices >= 1, "{USAGE}");
    if common.bin.is_some() || common.probe.is_some() {
        bail!("--bin and --probe are for the VMM benches; this one runs the MDM in process");
    }
    let allowed = mdm::sim::devices_the_fd_limit_allows(devices)?;
    ensure!(
        allowed == devices,
        "RLIMIT_NOFILE's hard limit allows {allowed} devices, not {devices}"
    );
    let work = common.work.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pv-bench-mdm-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let load_before = bench::util::loadavg();
    let cluster = ScratchCluster::start_durable().context("PostgreSQL scratch cluster")?;
    let policy = signed_policy()?;
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut samples: Vec<(Kind, Sample)> = Vec::new();
    for run in 0..common.runs {
        let mut order = [Kind::Sqlite, Kind::Postgres];
        if run % 2 == 1 {
            order.reverse();
        }
        for kind in order {
            eprintln!("{TAG}: run {}/{} {}", run + 1, common.runs, kind.label());
            let dir = work.join(format!("{}-{run}", kind.label()));
            std::fs::create_dir_all(&dir)?;
            let store: Arc<dyn Store> = match kind {
                Kind::Sqlite => Arc::new(SqliteStore::open(&dir.join("mdm.db"))?),
                Kind::Postgres => {
                    let url = cluster.create_database(&format!("bench_{run}"))?;
                    Arc::new(PostgresStore::connect(&url, PG_CONNECTIONS)?)
                }
            };
            let sample = once(&clients, &dir, store, devices, &policy)
                .with_context(|| format!("run {} on {}", run + 1, kind.label()))?;
            eprintln!("{TAG}:   {sample:?}");
            samples.push((kind, sample));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    report(&common, devices, &samples, &load_before)
}

/// One run on `store`: a server, N devices enrolled, then one push to all of them.
fn once(
    clients: &tokio::runtime::Runtime,
    dir: &Path,
    store: Arc<dyn Store>,
    n: usize,
    policy: &str,
) -> Result<Sample> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mdm-server")
        .enable_all()
        .build()?;
    let mdm = Mdm::new(dir, store.clone(), ADMIN, PHASE_LIMIT)?;
    let config = mdm.tls_config(&["localhost".to_string()])?;
    let addr: SocketAddr = server_rt.block_on(async {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = tcp.local_addr()?;
        let listener = TlsListener::new(tcp, config)?;
        tokio::spawn(mdm::server::serve(
            mdm.clone(),
            listener,
            std::future::pending(),
        ));
        anyhow::Ok(addr)
    })?;
    let target = Target {
        addr,
        name: "localhost".into(),
        ca_pem: mdm.ca_pem().to_owned(),
        timeout: PHASE_LIMIT,
    };
    let tokens: Vec<String> = (0..n).map(|i| format!("bench-token-{i:06}")).collect();
    for t in &tokens {
        store.add_token(t, i64::MAX)?;
    }
    let sample = clients.block_on(async {
        let t0 = Instant::now();
        let devices = mdm::sim::enroll_all(&target, &tokens).await?;
        let enroll_s = t0.elapsed().as_secs_f64();
        ensure!(
            devices.len() == n,
            "{} of {n} devices enrolled",
            devices.len()
        );
        let enroll_retries = devices.iter().map(|d| d.retries).sum();
        let (queued, reached) = push(&mdm, &target, devices, policy).await?;
        anyhow::Ok(Sample {
            enroll_per_s: n as f64 / enroll_s,
            push_queued_s: queued.as_secs_f64(),
            push_reached_s: reached.as_secs_f64(),
            enroll_retries,
        })
    })?;
    server_rt.shutdown_timeout(Duration::from_secs(5));
    Ok(sample)
}

/// Every device long-polls; once all polls are held, `policy` is queued for each through the
/// admin API. The time until the last admin answer, and until the last device has its policy.
async fn push(
    mdm: &Arc<Mdm>,
    target: &Target,
    devices: Vec<SimDevice>,
    policy: &str,
) -> Result<(Duration, Duration)> {
    let n = devices.len();
    let ids: Vec<String> = devices
        .iter()
        .map(|d| d.enrolled.device_id.clone())
        .collect();
    let mut polls = tokio::task::JoinSet::new();
    for d in devices {
        polls.spawn(async move {
            let (status, commands) = d.poll(PHASE_LIMIT.as_secs()).await?;
            let id = &d.enrolled.device_id;
            ensure!(status == 200, "device {id}: poll answered {status}");
            let ok = commands.iter().any(|c| {
                c.kind == "policy" && c.device_id == *id && c.verify(&d.enrolled.command_key, id)
            });
            ensure!(ok, "device {id}: no policy command with a valid signature");
            anyhow::Ok(Instant::now())
        });
    }
    let t0 = Instant::now();
    while mdm.polls_open() < n {
        ensure!(
            t0.elapsed() < PHASE_LIMIT,
            "{} of {n} polls held after {PHASE_LIMIT:?}",
            mdm.polls_open()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admin = mdm::client::Client::new(
        target.addr,
        &target.name,
        &target.ca_pem,
        None,
        target.timeout,
    )?;
    let body = Arc::new(serde_json::to_vec(
        &serde_json::json!({"kind": "policy", "body": policy}),
    )?);
    let start = Instant::now();
    let mut queue = tokio::task::JoinSet::new();
    let mut queued = 0;
    for id in ids {
        if queue.len() >= PUSH_PARALLEL {
            queue.join_next().await.context("a push task")???;
            queued += 1;
        }
        let (admin, body) = (admin.clone(), body.clone());
        queue.spawn(async move {
            let path = format!("/v1/admin/devices/{id}/commands");
            let r = admin
                .request("POST", &path, Some(ADMIN), Some(&body))
                .await?;
            ensure!(r.status == 200, "queueing for {id}: {}", r.status);
            anyhow::Ok(())
        });
    }
    while let Some(done) = queue.join_next().await {
        done??;
        queued += 1;
    }
    ensure!(queued == n, "{queued} of {n} pushes queued");
    let all_queued = start.elapsed();
    let mut last = start;
    while let Some(done) = polls.join_next().await {
        last = last.max(done??);
    }
    Ok((all_queued, last - start))
}

/// A signed policy as `pocketvisor policy sign` makes it, base64 as `mdm policy push` sends it.
fn signed_policy() -> Result<String> {
    use base64::Engine as _;
    let mut body = format!(
        "version = 2\nissued_at = {}\nprofile = \"work\"\n\n[network]\ndefault = \"deny\"\nrules = [\n",
        policy::unix_now()
    );
    for i in 0..20 {
        body.push_str(&format!(
            "  {{ action = \"allow\", cidr = \"10.{i}.0.0/16\", protocol = \"tcp\", ports = \"443\" }},\n"
        ));
    }
    body.push_str("]\n\n[storage]\nencrypt_at_rest = true\n");
    let key = policy::OrgSecretKey::generate();
    let envelope = policy::envelope::sign(body.as_bytes(), &key)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(envelope))
}

fn report(common: &Common, n: usize, samples: &[(Kind, Sample)], load_before: &str) -> Result<()> {
    let of = |kind: Kind, f: fn(&Sample) -> f64| -> Stat {
        let v: Vec<f64> = samples
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, s)| f(s))
            .collect();
        Stat::of(&v)
    };
    let kinds = [Kind::Sqlite, Kind::Postgres];
    let load_after = bench::util::loadavg();
    if common.json {
        let stores: serde_json::Map<String, serde_json::Value> = kinds
            .iter()
            .map(|&k| {
                let runs: Vec<&Sample> = samples
                    .iter()
                    .filter(|(s, _)| *s == k)
                    .map(|(_, s)| s)
                    .collect();
                (
                    k.label().to_owned(),
                    serde_json::json!({
                        "enroll_per_s": of(k, |s| s.enroll_per_s),
                        "push_queued_s": of(k, |s| s.push_queued_s),
                        "push_reached_s": of(k, |s| s.push_reached_s),
                        "runs": runs,
                    }),
                )
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "devices": n,
                "runs": common.runs,
                "load_before": load_before,
                "load_after": load_after,
                "stores": stores,
            }))?
        );
        return Ok(());
    }
    println!("MDM, {n} devices, {} runs: median (min-max)", common.runs);
    println!(
        "{:<12} {:>24} {:>24} {:>24}",
        "store", "enrollments/s", "push queued (s)", "push reached all (s)"
    );
    for k in kinds {
        println!(
            "{:<12} {:>24} {:>24} {:>24}",
            k.label(),
            of(k, |s| s.enroll_per_s).to_string(),
            of(k, |s| s.push_queued_s).to_string(),
            of(k, |s| s.push_reached_s).to_string(),
        );
    }
    println!("load average before: {load_before}; after: {load_after}");
    Ok(())
}
