//! `pocketvisor snapshot`, `restore`, `pause` and `resume`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use vmm::{Request, RestoreOverrides, SerialConfig, Vm};

use crate::api;

/// Snapshot a running VM through its API socket.
#[derive(Args, Debug)]
#[command(after_help = "\
The VM must have been started with --api-socket. It is paused while the snapshot is written
and stays paused afterwards unless --resume (continue) or --stop (end the VM) is given.

EXAMPLE:
  pocketvisor run --kernel guest/out/probe.elf --cmdline pv.mode=counter --api-socket /tmp/pv.sock &
  pocketvisor snapshot --api-socket /tmp/pv.sock -o /tmp/snap --stop
  pocketvisor restore /tmp/snap")]
pub struct SnapshotArgs {
    /// The VMM's control socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Snapshot directory (created; an existing snapshot there is replaced).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Let the VM continue after the snapshot.
    #[arg(long, conflicts_with = "stop")]
    resume: bool,
    /// End the VM after the snapshot.
    #[arg(long)]
    stop: bool,
}

/// Restore a VM from a snapshot directory in this process and run it.
#[derive(Args, Debug)]
#[command(after_help = "\
The configuration saved in the snapshot is used; host-side paths can be changed with the
flags below. The exit status is the guest's, as for `run`.")]
pub struct RestoreArgs {
    /// The snapshot directory.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Where the serial console goes: stdout, file:PATH or none [default: as saved].
    #[arg(long, value_name = "WHERE", value_parser = crate::run::parse_serial)]
    serial: Option<SerialConfig>,
    /// Disk image paths replacing the saved ones, in order. Repeatable.
    #[arg(long, value_name = "PATH")]
    disk: Vec<PathBuf>,
    /// TAP names replacing the saved ones, in order. Repeatable.
    #[arg(long, value_name = "NAME")]
    tap: Vec<String>,
    /// The vsock unix socket path.
    #[arg(long, value_name = "PATH")]
    vsock_socket: Option<PathBuf>,
    /// Serve the control API on this unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Serve the display over VNC on a loopback HOST:PORT or unix:PATH (as `run --vnc`).
    #[arg(long, value_name = "HOST:PORT|unix:PATH", value_parser = crate::vnc::parse_vnc)]
    vnc: Option<crate::vnc::VncAddr>,
    /// Read the 64-byte key of each encrypted disk of the snapshot's configuration, in disk
    /// order, from stdin, which then ends (keys are never saved in a snapshot; the memory of
    /// a VM with an encrypted disk is saved encrypted and needs them too).
    #[arg(long)]
    disk_keys_stdin: bool,
}

/// Pause or resume a running VM through its API socket.
#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The VMM's control socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
}

/// `pocketvisor snapshot`.
pub fn snapshot(a: SnapshotArgs) -> Result<i32> {
    let dir = std::path::absolute(&a.output)
        .with_context(|| format!("bad output path {}", a.output.display()))?;
    let info = api::call(
        &a.api_socket,
        &Request::Snapshot {
            dir: dir.clone(),
            resume: a.resume,
        },
    )?;
    outln!("snapshot written to {} ({info})", dir.display());
    if a.stop {
        api::call(&a.api_socket, &Request::Stop)?;
    }
    Ok(0)
}

/// `pocketvisor restore`.
pub fn restore(a: RestoreArgs) -> Result<i32> {
    let mut overrides = RestoreOverrides {
        serial: a.serial,
        disks: a.disk,
        vsock_socket: a.vsock_socket,
        taps: a.tap,
        disk_keys: Vec::new(),
        vsock_cid: None,
        macs: Vec::new(),
    };
    if !a.dir.exists() {
        return Err(crate::failure::Failure::NotFound(format!(
            "cannot restore {}: no such snapshot directory",
            a.dir.display()
        ))
        .into());
    }
    if a.disk_keys_stdin {
        // Which disks are encrypted is the snapshot's (checked again by the restore).
        let mut cfg = vmm::snapshot::inspect(&a.dir)
            .with_context(|| format!("cannot restore {}", a.dir.display()))?;
        crate::vmm_cmd::read_disk_keys(&mut std::io::stdin().lock(), &mut cfg)?;
        overrides.disk_keys = cfg.disks.iter().map(|d| d.key.clone()).collect();
    }
    let vm = Vm::restore(&a.dir, &overrides)
        .with_context(|| format!("cannot restore {}", a.dir.display()))?;
    let _vnc = a.vnc.map(|v| crate::vnc::start(&vm, &v)).transpose()?;
    crate::run::run_vm(vm, a.api_socket.as_deref())
}

/// `pocketvisor pause`.
pub fn pause(a: ControlArgs) -> Result<i32> {
    outln!("{}", api::call(&a.api_socket, &Request::Pause)?);
    Ok(0)
}

/// `pocketvisor resume`.
pub fn resume(a: ControlArgs) -> Result<i32> {
    outln!("{}", api::call(&a.api_socket, &Request::Resume)?);
    Ok(0)
}
