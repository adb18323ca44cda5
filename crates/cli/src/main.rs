//! `pocketvisor`: the command-line front end of the VMM.

mod doctor;
mod run;

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
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the error and its causes.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("pocketvisor: error: {msg}");
            std::process::exit(1);
        }
    }
}
