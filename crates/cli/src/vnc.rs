//! `--vnc ADDR`: the VM's screen over RFB (VNC) on loopback TCP or a unix socket
//! (`crates/rfb` is the server).

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vmm::Vm;

/// Where the VNC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VncAddr {
    /// A loopback TCP address (port 0: any free port, printed at start).
    Tcp(SocketAddr),
    /// A unix socket path (`unix:PATH`).
    Unix(PathBuf),
}

/// Parses `HOST:PORT` (loopback only: the server has no authentication) or `unix:PATH`.
pub fn parse_vnc(s: &str) -> Result<VncAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a socket path".into());
        }
        return Ok(VncAddr::Unix(PathBuf::from(path)));
    }
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is neither HOST:PORT (e.g. 127.0.0.1:5900) nor unix:PATH"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address: the VNC server has no authentication, so it \
             listens on loopback (127.0.0.1, ::1) or a unix socket only",
            addr.ip()
        ));
    }
    Ok(VncAddr::Tcp(addr))
}

/// Removes a unix VNC socket when the VM ends.
pub struct VncGuard(Option<PathBuf>);

impl Drop for VncGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts the VNC server for `vm`'s screen at `addr` and prints where it listens.
pub fn start(vm: &Vm, addr: &VncAddr) -> Result<VncGuard> {
    let Some(handles) = vm.screen() else {
        bail!("--vnc needs a display: add --gpu");
    };
    let screen = rfb::Screen {
        display: handles.display,
        keyboard: handles.keyboard,
        touch: handles.touch,
        name: "pocketvisor".into(),
    };
    let (listener, guard) = match addr {
        VncAddr::Tcp(a) => {
            let l = TcpListener::bind(a).with_context(|| format!("cannot listen on {a}"))?;
            let bound = l.local_addr().context("the VNC listener's address")?;
            eprintln!("pocketvisor: VNC server on {bound}");
            (rfb::Listener::Tcp(l), VncGuard(None))
        }
        VncAddr::Unix(p) => {
            crate::api::remove_stale_socket(p)?;
            let l = UnixListener::bind(p)
                .with_context(|| format!("cannot listen on {}", p.display()))?;
            crate::api::owner_only(p)?;
            eprintln!("pocketvisor: VNC server on unix:{}", p.display());
            (rfb::Listener::Unix(l), VncGuard(Some(p.clone())))
        }
    };
    rfb::serve(listener, screen, on_vnc_thread).context("cannot start the VNC thread")?;
    Ok(guard)
}

/// A jailed VMM with a display serves VNC on `vmm_api::jail::VNC_SOCKET_NAME` next to its
/// API socket (the handset daemon exposes it on loopback: `profile view`).
pub fn start_next_to_api(vm: &Vm, api_socket: Option<&Path>) -> Result<Option<VncGuard>> {
    let (Some(_), Some(dir)) = (vm.screen(), api_socket.and_then(Path::parent)) else {
        return Ok(None);
    };
    let path = dir.join(vmm::vmm_api::jail::VNC_SOCKET_NAME);
    start(vm, &VncAddr::Unix(path)).map(Some)
}

/// The VNC threads narrow themselves to their own seccomp filter in a jailed VMM.
fn on_vnc_thread() {
    devices::threads::started(devices::threads::ThreadKind::Display);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_unix_addresses_are_taken_others_refused() {
        assert_eq!(
            parse_vnc("127.0.0.1:5900"),
            Ok(VncAddr::Tcp("127.0.0.1:5900".parse().unwrap()))
        );
        assert!(matches!(parse_vnc("[::1]:0"), Ok(VncAddr::Tcp(_))));
        assert_eq!(
            parse_vnc("unix:/run/v.sock"),
            Ok(VncAddr::Unix("/run/v.sock".into()))
        );
        let wide = parse_vnc("0.0.0.0:5900").unwrap_err();
        assert!(wide.contains("not a loopback address"), "{wide}");
        assert!(parse_vnc("192.168.1.2:5900").is_err());
        assert!(parse_vnc("unix:").is_err());
        assert!(parse_vnc("localhost").is_err());
    }
}
