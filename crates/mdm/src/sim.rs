//! Simulated devices for the load test and the MDM bench: many devices enrolling at once and
//! then long-polling, through the same [`Client`] a handset's link uses.

use std::net::SocketAddr;
use std::time::Duration;

use crate::client::{Client, ClientError, DeviceKey};
use crate::protocol::{Enrolled, SignedCommand};

/// Why a simulated device failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("device {0}: {1}")]
    Client(usize, ClientError),
    #[error("device {0}: enrollment answered {1}: {2}")]
    Refused(usize, u16, String),
    #[error("device {0}: enrollment answer unreadable: {1}")]
    BadAnswer(usize, String),
    #[error("RLIMIT_NOFILE: {0}")]
    FdLimit(std::io::Error),
}

/// Tries of an enrollment whose connection fails before the server answers.
const ENROLL_TRIES: u32 = 3;

/// An enrolled device: what the server gave it, its key, and a client showing its certificate.
pub struct SimDevice {
    pub enrolled: Enrolled,
    pub key: DeviceKey,
    pub client: Client,
    /// Enrollment connections that failed before an answer and were tried again.
    pub retries: u32,
}

/// Where the simulated devices connect.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// A name in the server's certificate.
    pub name: String,
    /// The server's CA certificate (PEM).
    pub ca_pem: String,
    /// Longest a request (a long poll included) may take.
    pub timeout: Duration,
}

impl SimDevice {
    /// Device number `index` enrolls with `token` under a fresh key. A connection that fails
    /// before the server answers is tried again, a second later, up to three tries in all, as
    /// the handset's link does: a token is spent only by an answered enrollment.
    pub async fn enroll(index: usize, target: &Target, token: &str) -> Result<SimDevice, SimError> {
        let err = |e| SimError::Client(index, e);
        let key = DeviceKey::generate().map_err(err)?;
        let body = serde_json::to_vec(&key.enroll_body(token))
            .map_err(|e| SimError::BadAnswer(index, e.to_string()))?;
        let anon = Client::new(
            target.addr,
            &target.name,
            &target.ca_pem,
            None,
            target.timeout,
        )
        .map_err(err)?;
        let mut retries = 0;
        let reply = loop {
            match anon.request("POST", "/v1/enroll", None, Some(&body)).await {
                Ok(r) => break r,
                Err(_) if retries + 1 < ENROLL_TRIES => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(err(e)),
            }
        };
        if reply.status != 200 {
            let text = String::from_utf8_lossy(&reply.body).into_owned();
            return Err(SimError::Refused(index, reply.status, text));
        }
        let enrolled: Enrolled = serde_json::from_slice(&reply.body)
            .map_err(|e| SimError::BadAnswer(index, e.to_string()))?;
        let client = Client::new(
            target.addr,
            &target.name,
            &target.ca_pem,
            Some((&enrolled.cert_pem, &key)),
            target.timeout,
        )
        .map_err(err)?;
        Ok(SimDevice {
            enrolled,
            key,
            client,
            retries,
        })
    }

    /// One long poll held up to `wait` seconds: the status, and the commands when it is 200.
    /// The caller checks their signatures ([`SignedCommand::verify`]).
    pub async fn poll(&self, wait: u64) -> Result<(u16, Vec<SignedCommand>), ClientError> {
        let r = self
            .client
            .request(
                "GET",
                &format!("/v1/device/commands?wait={wait}"),
                None,
                None,
            )
            .await?;
        let commands = if r.status == 200 {
            serde_json::from_slice(&r.body).map_err(|_| ClientError::BadResponse)?
        } else {
            Vec::new()
        };
        Ok((r.status, commands))
    }
}

/// Enrolls one device per token, all at once; the devices in token order.
pub async fn enroll_all(target: &Target, tokens: &[String]) -> Result<Vec<SimDevice>, SimError> {
    let mut set = tokio::task::JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let (target, token) = (target.clone(), token.clone());
        set.spawn(async move { (i, SimDevice::enroll(i, &target, &token).await) });
    }
    let mut devices: Vec<Option<SimDevice>> = (0..tokens.len()).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, device) = joined.map_err(|e| SimError::BadAnswer(usize::MAX, e.to_string()))?;
        devices[i] = Some(device?);
    }
    Ok(devices.into_iter().flatten().collect())
}

/// Raises the soft RLIMIT_NOFILE to what `wanted` polling devices and their server need in one
/// process (two descriptors per device, its socket and the server's, plus 256), up to the hard
/// limit; returns how many devices the limit allows (`wanted` or fewer).
pub fn devices_the_fd_limit_allows(wanted: usize) -> Result<usize, SimError> {
    let need = u64::try_from(wanted.saturating_mul(2).saturating_add(256)).unwrap_or(u64::MAX);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the rlimit struct it is given, which lives on our stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(SimError::FdLimit(std::io::Error::last_os_error()));
    }
    if lim.rlim_cur < need {
        lim.rlim_cur = need.min(lim.rlim_max);
        // SAFETY: setrlimit only reads the rlimit struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(SimError::FdLimit(std::io::Error::last_os_error()));
        }
    }
    Ok(usize::try_from(lim.rlim_cur.saturating_sub(256) / 2)
        .unwrap_or(usize::MAX)
        .min(wanted))
}
