//! The handset daemon: several isolated profiles on one device, each a VM in its own VMM
//! process, supervised, switched between foreground and background, over a REST API.
//!
//! # State directory layout (stable: `pocketvisor export`/`import` read it)
//!
//! ```text
//! <state-dir>/                      default /var/lib/pocketvisor, or $POCKETVISOR_STATE_DIR
//!                                   (the directory is mode 0700, its files owner only)
//!   org.pub                         the organisation's policy key the handset trusts
//!                                   (`pocketvisor policy trust`, `handset --org-key`)
//!   audit.key                       secret key of the audit log's content digests (0600)
//!   device.key                      wraps the data keys of profiles encrypted at rest (0600,
//!                                   made at the first such create or import)
//!   assets/                         guest assets (kernels, initrds) that specs name by file
//!                                   name; put there by the administrator (spec::check_asset)
//!   handset.db                      SQLite (WAL): profiles, events, audit; PRAGMA user_version
//!                                   = number of applied migrations (db::MIGRATIONS)
//!   handset.db-wal, handset.db-shm  SQLite's WAL files
//!   handset.sock                    the REST API (HTTP/1.1 over a unix socket, mode 0600)
//!   handset.lock                    flock()ed by the running daemon
//!   mdm/                            with `handset --mdm`: the enrollment (device-key.pk8,
//!                                   enrollment.json, 0600) and journal/<id>.json, the MDM
//!                                   commands under way or whose result is not yet delivered
//!                                   ([`mdm_link`])
//!   exports/<pid>                   an export under way: its temporary file
//!                                   (`<out>.tmp-<hex>`), removed by the next daemon start
//!                                   or export once that process is gone (see [`exports`])
//!   cloud/                          this device's identity towards cloud hosts (`profile
//!                                   offload`): cert.pem, key.pem (0600), ca.pem,
//!                                   migration.key (0600); put there by the administrator
//!   jail/<name>/                    with --jail: the jailer's root for the profile's VMM
//!                                   (created and removed by `pocketvisor vmm`)
//!   profiles/<name>/
//!     profile.toml                  the profile spec (spec::ProfileSpec), canonical
//!     policy.pvpol                  the signed IT policy in force (org_policy), if any
//!     vm.toml                       the VMM configuration generated at the last start (kept
//!                                   outside run/, which the jailed VMM sees)
//!     disks/<disk>.img              raw disk images (sparse, size_mib each; AES-256-XTS
//!                                   ciphertext with `encrypt_at_rest`)
//!     disk.key                      with `encrypt_at_rest`: the profile's disk data key,
//!                                   wrapped under `device.key` ([`disk_keys`])
//!     .wiping                       a wipe under way ([`wipe`]: finished by the next daemon)
//!     lock.json                     locked or not, the passcode's argon2id hash, failed
//!                                   unlock attempts ([`lock`]); absent: unlocked, no passcode
//!     run/                          only while a VMM runs (emptied at each start):
//!       api.sock                      the VMM's control socket (JSON lines)
//!       vsock.sock                    the guest's vsock host socket (Firecracker protocol)
//!       serial.log                    the guest's serial console (rotated to serial.log.1
//!                                     at 4 MiB by the VMM: at most 8 MiB in all)
//!       vmm.log                       the VMM process's stdout and stderr
//!       serial.log.prev, vmm.log.prev the previous run's logs (kept across one restart)
//!     intent                        only while a suspend, resume, stop, offload or return
//!                                   is under way: the
//!                                   step (written before it acts; a daemon that died mid-step
//!                                   finishes or rolls it back at its next start)
//!     snapshot/                     only while suspended: the VMM snapshot (restored by
//!                                   `resume`, removed once the restored VM runs)
//!     offloaded                     while offloaded: the cloud host it runs at (JSON)
//!     cloud-kept/                   while offloaded: the guest as it was at the switch
//!                                   (`migrate --keep`), the base of its return
//!     moved                         written by an export that moves the profile (JSON: the
//!                                   file; "pending" until that file is complete, see
//!                                   [`moved`])
//!   profiles/.deleting-<name>/      a profile being deleted (renamed here first; the next
//!                                   daemon finishes a delete cut short, see [`leftovers`])
//!   profiles/.import-<pid>-<n>/     an import's staging directory (swept once its process
//!                                   is gone by the next import or daemon start)
//! ```
//!
//! Profile names are `[a-z0-9-]{1,32}`. Files that replace state are written to a temporary
//! file, fsynced and renamed. A profile is consistent on disk (and safe to export) when its
//! state in `handset.db` is `stopped` or `suspended`.
//!
//! # Processes
//!
//! Each started profile runs `pocketvisor run --config vm.toml --api-socket run/api.sock`,
//! or with `--jail` `pocketvisor vmm --config ... --jail-id <name> --jail-root <state>/jail`
//! (see [`vmm_proc::vmm_args`]), in its own process group, in the cgroup
//! `<cgroup mount>/pocketvisor/<name>` ([`cgroup`]). A resumed (restored) profile runs
//! `pocketvisor vmm --restore <snapshot> ...` (jailed) or `pocketvisor restore`. On
//! SIGTERM/SIGINT the daemon stops every VM cleanly before exiting (a VM without its supervisor would be neither restarted nor
//! switched); if the daemon dies without that (SIGKILL, crash), the next daemon adopts the
//! VMMs it finds still running and restarts the others per their restart policy.

pub mod agents;
pub mod api;
pub mod api_types;
pub mod audit_key;
pub mod cgroup;
pub mod channels;
pub mod client;
pub mod console;
pub mod daemon;
pub mod db;
pub mod disk_crypt;
pub mod disk_keys;
pub mod error;
pub mod event_stream;
pub mod exports;
pub mod fault;
pub mod host_channels;
pub mod leftovers;
pub mod lock;
pub mod mdm_link;
pub mod moved;
pub mod net_drops;
pub mod org_policy;
pub mod passcode;
pub mod phone;
pub mod policy_clock;
pub mod policy_travel;
pub mod run_files;
pub mod secret_file;
pub mod spec;
pub mod state_dir;
pub mod vmm_proc;
pub mod wipe;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

pub use api_types::{CreateProfile, DaemonInfo, ProfileInfo, ProfileState};
pub use daemon::{find_probe, Handset, Options};
pub use db::Event;
pub use error::{Error, Result};
pub use spec::ProfileSpec;
pub use state_dir::StateDir;

/// Runs the daemon until SIGTERM or SIGINT, then stops the VMs and returns.
pub async fn run(opts: Options) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::io("cannot handle SIGTERM"))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(Error::io("cannot handle SIGINT"))?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    run_until(opts, shutdown).await
}

/// Runs the daemon until `shutdown` completes, then stops the VMs and returns.
pub async fn run_until(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let dir = opts.state_dir.clone();
    state_dir::create_private_dir(dir.root())?;
    let lock = std::fs::File::options()
        .mode(0o600)
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.lock_file())
        .map_err(Error::io(format!(
            "cannot open {}",
            dir.lock_file().display()
        )))?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Conflict(format!(
            "another handset daemon is running on {}",
            dir.root().display()
        )));
    }
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!(
            "not running as root: jailed VMMs (namespaces, cgroups), TAP devices and cgroup \
             limits need root; profiles may fail to start (see `pocketvisor doctor`)"
        );
    }
    // The phone's address and certificate are checked before anything starts.
    let phone = match &opts.phone {
        Some(cfg) => Some(phone::bind(cfg).await?),
        None => None,
    };
    let h = Handset::open(opts)?;
    let sock = dir.socket();
    // We hold the lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(Error::io(format!("cannot listen on {}", sock.display())))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("cannot chmod {}", sock.display())))?;
    h.recover().await?;
    h.audit("-", "daemon-start", &format!("pid {}", std::process::id()));
    tracing::info!(
        "handset daemon (pid {}) listening on {}",
        std::process::id(),
        sock.display()
    );
    let (stopping, stop_seen) = tokio::sync::watch::channel(false);
    let phone_task = phone.map(|bound| {
        h.set_phone_url(bound.url());
        let page = bound.url().split('?').next().unwrap_or_default();
        tracing::info!("browser phone at {page} (`profile view` prints it with the token)");
        let mut stop_seen = stop_seen.clone();
        let served = phone::serve(h.clone(), bound, async move {
            let _ = stop_seen.wait_for(|s| *s).await;
        });
        tokio::spawn(served)
    });
    // Housekeeping: the policy limits of running profiles (expiry, offline) every
    // POLICY_CHECK_EVERY, the network refusals into the audit log every drop_audit_every.
    let drops_task = {
        let h = h.clone();
        let mut stop_seen = stop_seen.clone();
        tokio::spawn(async move {
            let every = h.drop_audit_every();
            let tick = every.min(daemon::POLICY_CHECK_EVERY);
            let mut last_drops = std::time::Instant::now();
            loop {
                let stopped = tokio::select! {
                    _ = tokio::time::sleep(tick) => false,
                    r = stop_seen.wait_for(|s| *s) => { drop(r); true }
                };
                if stopped {
                    break;
                }
                h.enforce_policy_limits().await;
                if last_drops.elapsed() >= every {
                    last_drops = std::time::Instant::now();
                    h.audit_all_net_drops().await;
                }
            }
        })
    };
    // Replication of the profiles that have it, while they run.
    let replicate_task = tokio::spawn(daemon::replicate::run(h.clone(), stop_seen.clone()));
    let mdm_task = h.mdm_options().cloned().map(|opts| {
        let stop_seen = stop_seen.clone();
        tokio::spawn(mdm_link::run(h.clone(), opts, stop_seen))
    });
    let closer = h.clone();
    let shutdown = async move {
        shutdown.await;
        closer.close_streams();
        let _ = stopping.send(true);
    };
    let served = api::serve(h.clone(), listener, shutdown).await;
    tracing::info!("handset daemon stopping: suspending or stopping the running profiles");
    let _ = drops_task.await;
    let _ = replicate_task.await;
    if let Some(task) = mdm_task {
        let _ = task.await;
    }
    h.shutdown().await;
    // Its screen sessions ended with the VMMs; it stops taking new requests with the API.
    if let Some(task) = phone_task {
        match tokio::time::timeout(std::time::Duration::from_secs(5), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("browser phone server failed: {e}"),
            Ok(Err(e)) => tracing::warn!("browser phone server task: {e}"),
            Err(_) => tracing::warn!("browser phone server did not stop within 5 s"),
        }
    }
    h.audit("-", "daemon-stop", "");
    let _ = std::fs::remove_file(&sock);
    tracing::info!(
        "handset daemon stopped; no longer listening on {}",
        sock.display()
    );
    drop(lock);
    served.map_err(Error::io("API server failed"))
}

/// [`run`] on a new multi-threaded tokio runtime (for the CLI).
pub fn run_blocking(opts: Options) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Error::io("cannot start the async runtime"))?;
    rt.block_on(run(opts))
}
