//! A device's MDM enrollment as the handset keeps it, and its verified view of commands.
//!
//! `<dir>/` holds `device-key.pk8` (0600) and `enrollment.json` (device id, certificate, CA,
//! command key; 0600), both written temp + fsync + rename. [`Enrollment::poll`] returns only
//! commands whose signature by the enrolled command key verifies for this device; any other
//! is dropped and counted, never acted on.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::ca::write_atomic;
use crate::client::{Client, ClientError, DeviceKey};
use crate::protocol::{Enrolled, SignedCommand};

const KEY_FILE: &str = "device-key.pk8";
const ENROLLMENT_FILE: &str = "enrollment.json";

/// Device-side failures.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Io(String),
    #[error("the server refused ({0}): {1}")]
    Refused(u16, String),
    #[error("bad answer from the server")]
    BadAnswer,
}

/// What one poll gave: commands to act on and those refused as not signed for this device
/// by the enrolled command key (never to be acted on).
#[derive(Debug, Default)]
pub struct Polled {
    pub commands: Vec<SignedCommand>,
    pub refused: Vec<SignedCommand>,
}

/// An enrolled device.
pub struct Enrollment {
    pub enrolled: Enrolled,
    key: DeviceKey,
    client: Client,
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> DeviceError + '_ {
    move |e| DeviceError::Io(format!("{}: {e}", what.display()))
}

fn refused(status: u16, body: &[u8]) -> DeviceError {
    DeviceError::Refused(status, String::from_utf8_lossy(body).into_owned())
}

impl Enrollment {
    /// Enrolls with `token` at `addr` (certificate name `name`, trusting `ca_pem`), or loads
    /// the enrollment already kept in `dir` (the token is then not sent).
    pub async fn enroll_once(
        dir: &Path,
        addr: SocketAddr,
        name: &str,
        ca_pem: &str,
        token: &str,
    ) -> Result<Self, DeviceError> {
        if dir.join(ENROLLMENT_FILE).exists() {
            return Self::load(dir, addr, name);
        }
        let key = DeviceKey::generate()?;
        let anon = Client::new(addr, name, ca_pem, None, Duration::from_secs(60))?;
        let body =
            serde_json::to_vec(&key.enroll_body(token)).map_err(|_| DeviceError::BadAnswer)?;
        let r = anon
            .request("POST", "/v1/enroll", None, Some(&body))
            .await?;
        if r.status != 200 {
            return Err(refused(r.status, &r.body));
        }
        let enrolled: Enrolled =
            serde_json::from_slice(&r.body).map_err(|_| DeviceError::BadAnswer)?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let kept = |e: crate::CaError| DeviceError::Io(e.to_string());
        write_atomic(&dir.join(KEY_FILE), key.pkcs8(), 0o600).map_err(kept)?;
        let json = serde_json::to_vec(&enrolled).map_err(|_| DeviceError::BadAnswer)?;
        write_atomic(&dir.join(ENROLLMENT_FILE), &json, 0o600).map_err(kept)?;
        Self::load(dir, addr, name)
    }

    /// Loads the enrollment kept in `dir`.
    pub fn load(dir: &Path, addr: SocketAddr, name: &str) -> Result<Self, DeviceError> {
        let key_path = dir.join(KEY_FILE);
        let key = DeviceKey::from_pkcs8(&std::fs::read(&key_path).map_err(io(&key_path))?)?;
        let path = dir.join(ENROLLMENT_FILE);
        let enrolled: Enrolled = serde_json::from_slice(&std::fs::read(&path).map_err(io(&path))?)
            .map_err(|_| DeviceError::Io(format!("{}: damaged", path.display())))?;
        let identity = Some((enrolled.cert_pem.as_str(), &key));
        let client = Client::new(
            addr,
            name,
            &enrolled.ca_pem,
            identity,
            Duration::from_secs(120),
        )?;
        Ok(Enrollment {
            enrolled,
            key,
            client,
        })
    }

    /// Long-polls up to `wait_secs`; keeps only commands the server signed for this device.
    pub async fn poll(&self, wait_secs: u64) -> Result<Polled, DeviceError> {
        let path = format!("/v1/device/commands?wait={wait_secs}");
        let r = self.client.request("GET", &path, None, None).await?;
        if r.status != 200 {
            return Err(refused(r.status, &r.body));
        }
        let all: Vec<SignedCommand> =
            serde_json::from_slice(&r.body).map_err(|_| DeviceError::BadAnswer)?;
        Ok(self.verified(all))
    }

    /// Splits commands into those signed by the enrolled command key for this device and
    /// those refused.
    pub fn verified(&self, all: Vec<SignedCommand>) -> Polled {
        let mut out = Polled::default();
        for c in all {
            if c.verify(&self.enrolled.command_key, &self.enrolled.device_id) {
                out.commands.push(c);
            } else {
                out.refused.push(c);
            }
        }
        out
    }

    /// Whether `dir` holds an enrollment (a start then needs no token).
    pub fn exists(dir: &Path) -> bool {
        dir.join(ENROLLMENT_FILE).is_file()
    }

    /// Sends a compliance report (any JSON object) for this device.
    pub async fn send_compliance(&self, report: &serde_json::Value) -> Result<(), DeviceError> {
        let body = report.to_string();
        let r = self
            .client
            .request("POST", "/v1/device/compliance", None, Some(body.as_bytes()))
            .await?;
        if r.status != 204 {
            return Err(refused(r.status, &r.body));
        }
        Ok(())
    }

    /// Asks for a key lease of `secs`; returns it once its signature by the enrolled command
    /// key verifies for this device.
    pub async fn lease(&self, secs: u64) -> Result<crate::protocol::Lease, DeviceError> {
        let body = serde_json::json!({ "secs": secs }).to_string();
        let r = self
            .client
            .request("POST", "/v1/device/lease", None, Some(body.as_bytes()))
            .await?;
        if r.status != 200 {
            return Err(refused(r.status, &r.body));
        }
        let lease: crate::protocol::Lease =
            serde_json::from_slice(&r.body).map_err(|_| DeviceError::BadAnswer)?;
        if !lease.verify(&self.enrolled.command_key, &self.enrolled.device_id) {
            return Err(DeviceError::BadAnswer);
        }
        Ok(lease)
    }

    /// Reports a command's result, signed by the device key.
    pub async fn report(&self, command_id: i64, result: &str) -> Result<(), DeviceError> {
        let body = serde_json::json!({
            "command_id": command_id,
            "result": result,
            "signature": self.key.sign_result(&self.enrolled.device_id, command_id, result),
        })
        .to_string();
        let r = self
            .client
            .request("POST", "/v1/device/results", None, Some(body.as_bytes()))
            .await?;
        if r.status != 204 {
            return Err(refused(r.status, &r.body));
        }
        Ok(())
    }
}
