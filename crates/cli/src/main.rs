//! `pocketvisor`: the command-line front end of the VMM.

// Declared first so its `outln!`/`out!` macros are in scope in every module below.
#[macro_use]
mod stdout;

mod api;
mod balloon;
mod civil_time;
mod cloud;
mod console;
mod doctor;
mod failure;
mod follow;
mod guest_data;
mod handset;
mod mdm;
mod migrate;
mod policy;
mod portable;
mod profile;
mod replica;
mod replica_dir;
mod run;
mod screenshot;
mod snapshot;
mod twin_net;
mod twin_vmm;
mod vmm_cmd;
mod vnc;
mod vsock;

use clap::{Parser, Subcommand};

/// pocketvisor: run isolated guest operating systems (profiles) on KVM.
#[derive(Parser)]
#[command(name = "pocketvisor", version, about, long_about = None)]
#[command(after_help = "\
EXIT STATUS (every command but `run`, which exits with the guest's status):
  0  done
  1  failed (one `pocketvisor: error: ...` line on stderr)
  2  bad command line (usage)
  3  not found (no such profile, file or path)
  4  refused by policy (a cross-profile transfer the profiles' channels do not allow)
With --json, a failure is also one JSON object on stdout: {\"error\": \"...\", \"exit_code\": N}.

LOGGING: --log-level LEVEL (error, warn, info, debug, trace, or a filter like
handset=debug), else $RUST_LOG, else $POCKETVISOR_LOG; default warn (info for `handset`). No
colour unless stderr is a terminal.")]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or `crate=level,...`); overrides $RUST_LOG.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and wait until it powers off; exits with the guest's exit status.
    Run(Box<run::RunArgs>),
    /// Report what this host can run: KVM kind, TAP, vsock, and which guests work here.
    Doctor(doctor::DoctorArgs),
    /// Snapshot a running VM (started with --api-socket) into a directory.
    Snapshot(snapshot::SnapshotArgs),
    /// Restore a VM from a snapshot directory and run it.
    Restore(snapshot::RestoreArgs),
    /// Live-migrate a running VM (started with --api-socket) to a host waiting in `receive`.
    Migrate(migrate::MigrateArgs),
    /// Wait for a live migration from another host and run the VM that arrives.
    Receive(Box<migrate::ReceiveArgs>),
    /// The cloud host: receive devices' profiles as twins and run them (`cloud serve`).
    Cloud(cloud::CloudArgs),
    /// Pause a running VM in memory (started with --api-socket).
    Pause(snapshot::ControlArgs),
    /// Set or show a running VM's balloon (started with --balloon and --api-socket).
    Balloon(balloon::BalloonArgs),
    /// Unpause a VM paused in memory (`resume` is the old name).
    #[command(alias = "resume")]
    Unpause(snapshot::ControlArgs),
    /// Save what a running VM's display (--gpu, --api-socket) shows as a PNG or PPM image.
    Screenshot(screenshot::ScreenshotArgs),
    /// Connect to a guest's vsock port through its VMM (--vsock): stdin to the guest, the
    /// guest's bytes to stdout.
    Vsock(vsock::VsockArgs),
    /// Run one VM jailed (namespaces, private root, cgroup, no privileges, seccomp).
    Vmm(Box<vmm_cmd::VmmArgs>),
    /// Run the handset daemon (profiles, supervision, foreground switching, REST API).
    Handset(handset::HandsetArgs),
    /// Manage the handset's profiles: create, set, start, stop, suspend (to disk), resume,
    /// switch, logs, events and more (`profile --help` lists every command).
    Profile(Box<profile::ProfileArgs>),
    /// Write a profile (spec, disks, snapshot) to one encrypted portable file.
    Export(Box<portable::ExportArgs>),
    /// Recreate a profile from a portable file (verified before anything is created).
    Import(Box<portable::ImportArgs>),
    /// Create an X25519 identity for `export --recipient` / `import --identity`.
    Keygen(portable::KeygenArgs),
    /// The organisation's signed IT policies: keygen, sign, verify, show, trust, apply.
    Policy(policy::PolicyArgs),
    /// The MDM server and its admin commands: serve, enroll-token, devices, policy push, lock,
    /// unlock, wipe, revoke, audit.
    Mdm(mdm::MdmArgs),
}

impl Command {
    /// Whether the command was asked for JSON output (its errors are then JSON too).
    fn json(&self) -> bool {
        match self {
            Command::Doctor(a) => a.json,
            Command::Profile(a) => a.json,
            Command::Export(a) => a.json,
            Command::Import(a) => a.json,
            Command::Policy(a) => a.json,
            _ => false,
        }
    }
}

/// Sets up logging on stderr: `--log-level`, else $RUST_LOG, else $POCKETVISOR_LOG, else
/// `default`; ANSI colour only on a terminal.
fn init_logging(level: Option<&str>, default: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_env("RUST_LOG")
            .or_else(|_| EnvFilter::try_from_env("POCKETVISOR_LOG"))
            .unwrap_or_else(|_| EnvFilter::new(default)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

/// Parses the command line. A bad value for a known flag (`--memory lots`) is the README's
/// one `pocketvisor: error:` line and status 1; other command-line errors are clap's usage
/// text and status 2; `--help` and `--version` print and exit 0.
fn parse() -> Cli {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ValueValidation | ErrorKind::InvalidValue
            ) =>
        {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!(
                "pocketvisor: error: {}",
                first.strip_prefix("error: ").unwrap_or(first)
            );
            std::process::exit(failure::FAILURE);
        }
        Err(e) => e.exit(),
    }
}

fn main() {
    let cli = parse();
    // The daemon says what it does (where it listens, lifecycle events) by default.
    let default_level = if matches!(cli.command, Command::Handset(_)) {
        "info"
    } else {
        "warn"
    };
    if let Err(e) = init_logging(cli.log_level.as_deref(), default_level) {
        eprintln!("pocketvisor: error: {e}");
        std::process::exit(failure::USAGE);
    }
    let json = cli.command.json();
    let result = match cli.command {
        Command::Run(args) => run::main(*args),
        Command::Doctor(args) => doctor::main(args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Restore(args) => snapshot::restore(args),
        Command::Migrate(args) => migrate::migrate(args),
        Command::Receive(args) => migrate::receive(*args),
        Command::Cloud(args) => cloud::main(args),
        Command::Pause(args) => snapshot::pause(args),
        Command::Unpause(args) => snapshot::resume(args),
        Command::Balloon(args) => balloon::main(args),
        Command::Screenshot(args) => screenshot::main(args),
        Command::Handset(args) => handset::main(args),
        Command::Profile(args) => profile::main(*args),
        Command::Vmm(args) => vmm_cmd::main(*args),
        Command::Vsock(args) => vsock::main(args),
        Command::Export(args) => portable::export::main(*args),
        Command::Import(args) => portable::import::main(*args),
        Command::Keygen(args) => portable::keygen::main(args),
        Command::Policy(args) => policy::main(args),
        Command::Mdm(args) => mdm::main(args),
    };
    match result {
        Ok(0) if stdout::failed() => std::process::exit(1),
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let code = failure::exit_code(&e);
            let line = one_line(&e);
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "error": line.clone(), "exit_code": code })
                );
            }
            eprintln!("pocketvisor: error: {line}");
            std::process::exit(code);
        }
    }
}

/// The error and those of its causes its message does not already include, on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}
