//! `pocketvisor`: the command-line front end of the VMM.

// Declared first so its `outln!`/`out!` macros are in scope in every module below.
#[macro_use]
mod stdout;

mod api;
mod doctor;
mod handset;
mod portable;
mod profile;
mod run;
mod snapshot;
mod vmm_cmd;

use clap::{Parser, Subcommand};

/// pocketvisor: run isolated guest operating systems (profiles) on KVM.
#[derive(Parser)]
#[command(name = "pocketvisor", version, about, long_about = None)]
struct Cli {
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
    /// Pause a running VM (started with --api-socket).
    Pause(snapshot::ControlArgs),
    /// Resume a paused VM.
    Resume(snapshot::ControlArgs),
    /// Run one VM jailed (namespaces, private root, cgroup, no privileges, seccomp).
    Vmm(Box<vmm_cmd::VmmArgs>),
    /// Run the handset daemon (profiles, supervision, foreground switching, REST API).
    Handset(handset::HandsetArgs),
    /// Manage the handset's profiles: create, list, show, start, stop, suspend, resume, switch.
    Profile(Box<profile::ProfileArgs>),
    /// Write a profile (spec, disks, snapshot) to one encrypted portable file.
    Export(Box<portable::ExportArgs>),
    /// Recreate a profile from a portable file (verified before anything is created).
    Import(Box<portable::ImportArgs>),
    /// Create an X25519 identity for `export --recipient` / `import --identity`.
    Keygen(portable::KeygenArgs),
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("POCKETVISOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => run::main(*args),
        Command::Doctor(args) => doctor::main(args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Restore(args) => snapshot::restore(args),
        Command::Pause(args) => snapshot::pause(args),
        Command::Resume(args) => snapshot::resume(args),
        Command::Handset(args) => handset::main(args),
        Command::Profile(args) => profile::main(*args),
        Command::Vmm(args) => vmm_cmd::main(*args),
        Command::Export(args) => portable::export::main(*args),
        Command::Import(args) => portable::import::main(*args),
        Command::Keygen(args) => portable::keygen::main(args),
    };
    match result {
        Ok(0) if stdout::failed() => std::process::exit(1),
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("pocketvisor: error: {}", one_line(&e));
            std::process::exit(1);
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
