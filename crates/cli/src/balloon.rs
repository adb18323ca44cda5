//! `pocketvisor balloon`: set a running VM's balloon target, or show the balloon, through its
//! API socket (the `{"op":"device","id":"balloon",...}` requests), and optionally wait until
//! the guest's driver holds the target.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;
use vmm::Request;

use crate::api;

/// The balloon's device id on the API socket.
const BALLOON_ID: &str = "balloon";
/// How often `--wait` asks the VMM how far the guest got.
const POLL: Duration = Duration::from_millis(200);

/// Set or show the balloon of a running VM.
#[derive(Args, Debug)]
#[command(after_help = "\
The VM must have been started with --balloon and --api-socket. The target is how much of the
guest's RAM the balloon should take back from it; the guest's balloon driver inflates (or, for
a smaller target, deflates) in its own time, and the host frees the memory it gives back.
Without --target-mib the command prints the balloon's state and changes nothing.

OUTPUT: one line, `balloon target=T MiB actual=A MiB (P pages)`: T the target, A the
memory the guest's driver says the balloon holds (P in 4 KiB pages).

EXAMPLE:
  pocketvisor run --kernel bzImage --memory 1G --balloon --api-socket /tmp/pv.sock &
  pocketvisor balloon --api-socket /tmp/pv.sock --target-mib 256 --wait 60
  pocketvisor balloon --api-socket /tmp/pv.sock --target-mib 0")]
pub struct BalloonArgs {
    /// The VMM's control socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// The balloon's new target in MiB (0 gives the guest all its RAM back; at most the
    /// guest's RAM).
    #[arg(long, value_name = "MIB", allow_negative_numbers = true)]
    target_mib: Option<u64>,
    /// Wait up to SECS until the guest's driver holds the target; fail if it does not.
    #[arg(long, value_name = "SECS", requires = "target_mib")]
    wait: Option<u64>,
}

/// The part of the balloon's `stats` answer this command reads.
#[derive(Debug, Deserialize)]
struct BalloonState {
    target_mib: u64,
    target_pages: u32,
    actual_pages: u32,
    actual_mib: u64,
}

impl std::fmt::Display for BalloonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "balloon target={} MiB actual={} MiB ({} pages)",
            self.target_mib, self.actual_mib, self.actual_pages
        )
    }
}

/// One request to the VM's balloon; a VM without one is told apart from other failures.
fn ask(socket: &Path, request: serde_json::Value) -> Result<String> {
    let req = Request::Device {
        id: BALLOON_ID.into(),
        request,
    };
    match api::call(socket, &req) {
        Ok(info) => Ok(info),
        // The VMM's own words list the devices the VM has; say how to get a balloon instead.
        Err(e) if e.to_string().contains("has no balloon device") => Err(anyhow::anyhow!(
            "this VM has no balloon device (start it with --balloon)"
        )),
        Err(e) => Err(e),
    }
}

/// The balloon's state as the VMM sees it now (the guest's last report of `actual`).
fn state(socket: &Path) -> Result<BalloonState> {
    let info = ask(socket, serde_json::json!({"op": "stats"}))?;
    serde_json::from_str(&info).with_context(|| format!("bad balloon state from the VMM: {info}"))
}

/// `pocketvisor balloon`.
pub fn main(a: BalloonArgs) -> Result<i32> {
    if let Some(mib) = a.target_mib {
        ask(
            &a.api_socket,
            serde_json::json!({"op": "set_target", "target_mib": mib}),
        )
        .with_context(|| format!("cannot set the balloon's target to {mib} MiB"))?;
    }
    let mut st = state(&a.api_socket)?;
    if let Some(secs) = a.wait {
        let started = Instant::now();
        let limit = Duration::from_secs(secs);
        while st.actual_pages != st.target_pages {
            if started.elapsed() >= limit {
                bail!(
                    "the guest's balloon holds {} of {} MiB ({} of {} pages) after {secs} s: \
                     is its balloon driver loaded?",
                    st.actual_mib,
                    st.target_mib,
                    st.actual_pages,
                    st.target_pages
                );
            }
            std::thread::sleep(POLL);
            st = state(&a.api_socket)?;
        }
    }
    outln!("{st}");
    Ok(0)
}
