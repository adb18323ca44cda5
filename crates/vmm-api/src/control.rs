//! Control requests to a running VM and the API socket's wire format.
//!
//! The socket speaks one JSON object per line each way. Requests: `{"op":"pause"}`,
//! `{"op":"resume"}`, `{"op":"stop"}`, `{"op":"snapshot","dir":"/path","resume":false}` (the VM
//! stays paused unless `resume`), `{"op":"migrate","to":"host:port","key_file":"/path",
//! "downtime_ms":30,"tls":{"cert":"/path","key":"/path","ca":"/path"},"twin":"work"}` (live migration to a
//! destination waiting for it, over TLS 1.3 with both ends' certificates when `tls` is given;
//! `twin`, with `tls`: into that twin at a cloud host, `pocketvisor cloud serve`; `keep`: a
//! directory where this host keeps a snapshot of the VM as it is at the switch;
//! the answer comes once the guest runs there, and then this VMM ends), `{"op":"device","id":"balloon","request":{...}}` (a request
//! to one device by id, whose payload the device interprets; `info` is the device's JSON
//! answer), `{"op":"balloon","target_mib":N}` (short for the balloon's
//! `{"op":"set_target","target_mib":N}` device request), `{"op":"stats"}` (`info` is a
//! [`MemoryStats`] as JSON), `{"op":"checkpoint","dir":"/path","full":false}` (a replica's
//! incremental checkpoint into a new directory: see [`Request::Checkpoint`]). Answers: `{"ok":true,"info":"..."}` or
//! `{"ok":false,"error":"..."}`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a controller can ask of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Stop the vCPUs and device workers (the VM keeps its state).
    Pause,
    /// Let a paused VM run again.
    Resume,
    /// Pause and write a snapshot into `dir`; resume afterwards if `resume`.
    Snapshot {
        /// The directory to write (an absolute path as the VMM sees it).
        dir: PathBuf,
        /// Whether the VM runs again once the snapshot is written.
        resume: bool,
    },
    /// Write a replica's checkpoint into the new directory `dir`: what changed since the last
    /// checkpoint (everything for the first, after a migration, or if `full`), copied while
    /// the guest runs, then the last changes and the VM's state in a short pause; the guest
    /// runs on (the `vmm` crate's `replica` module).
    Checkpoint {
        /// The directory to create (an absolute path as the VMM sees it).
        dir: PathBuf,
        /// Start a new chain: every non-zero page and disk chunk.
        full: bool,
    },
    /// End the VM (`Vm::run` returns `Stopped`).
    Stop,
    /// Memory figures ([`MemoryStats`]): guest RAM and the balloon's state and guest statistics.
    Stats,
    /// A request to the device with this id (`balloon`, `disk0`, `net0`, `vsock`, `rng`,
    /// `serial`: see [`SERIAL_DEVICE_ID`]),
    /// whose payload the device interprets; the answer is the device's JSON answer. Every
    /// device answers `{"op":"counters"}` (requests, bytes, errors, interrupts); the
    /// balloon also takes `{"op":"set_target","target_mib":N}` and `{"op":"stats","wait_ms":N}`.
    Device {
        /// The device id.
        id: String,
        /// The device's own request (by convention an object with an `"op"`).
        request: serde_json::Value,
    },
    /// Pause and send a snapshot as one byte stream to the unix stream socket listening at
    /// `socket` (the VMM connects); resume afterwards if `resume`. Not served on the API
    /// socket yet (no wire op): the VMM library's callers use it.
    SnapshotStream {
        /// Where the receiver listens.
        socket: PathBuf,
        /// Whether the VM runs again once the snapshot is sent.
        resume: bool,
    },
    /// Live-migrate the running VM to a destination VMM waiting for it (see the `vmm` crate's
    /// `migration` module); on success the VM runs there and this one ends.
    Migrate {
        /// The destination, `host:port`, or `unix:PATH` without TLS (a relay on this host).
        to: String,
        /// A file holding the migration key both hosts share (64 hexadecimal digits).
        key_file: PathBuf,
        /// The longest the guest may stand still for the final copy, in milliseconds.
        downtime_ms: u64,
        /// This host's TLS identity and the authority the destination's certificate must
        /// chain to; `None`: plain TCP (still framed and authenticated by the key, but not
        /// encrypted).
        tls: Option<MigrationTls>,
        /// At a cloud host (`pocketvisor cloud serve`): the twin this VM becomes there
        /// (the request `offload NAME`); `None` for a plain destination.
        twin: Option<String>,
        /// Where this host keeps its last copy: a snapshot of the VM as it is at the switch
        /// (absolute; written before `Commit`), the base of a later return.
        keep: Option<PathBuf>,
        /// With `twin`: a clone (the request `clone NAME`): the guest runs on here after the
        /// switch too, and the cloud host gives the copy a fresh identity.
        clone: bool,
    },
}

/// One end's TLS identity for a migration: PEM files, absolute paths as the VMM sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationTls {
    /// This host's certificate chain, its own certificate first.
    pub cert: PathBuf,
    /// This host's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The certificate authority (or authorities) the peer's certificate must chain to.
    pub ca: PathBuf,
}

impl MigrationTls {
    /// Whether every path is absolute.
    pub fn is_absolute(&self) -> bool {
        [&self.cert, &self.key, &self.ca]
            .iter()
            .all(|p| p.is_absolute())
    }
}

/// The serial port's device id in [`Request::Device`]: `{"op":"input","bytes":[...]}` queues
/// host input for the guest's 16550 (answer `{"accepted":N,"dropped":M}`; at most
/// [`SERIAL_INPUT_MAX`] bytes a request, and what does not fit in the port's bounded queue is
/// dropped and counted), `{"op":"counters"}` answers `input_bytes`, `input_dropped`, `waiting`.
pub const SERIAL_DEVICE_ID: &str = "serial";

/// The most bytes one serial `input` request carries.
pub const SERIAL_INPUT_MAX: usize = 4096;

/// The device request that types `bytes` into the guest's serial port.
pub fn serial_input(bytes: &[u8]) -> Request {
    Request::Device {
        id: SERIAL_DEVICE_ID.into(),
        request: serde_json::json!({"op": "input", "bytes": bytes}),
    }
}

/// The device request a `{"op":"balloon","target_mib":N}` line stands for.
pub fn balloon_target(target_mib: u64) -> Request {
    Request::Device {
        id: "balloon".into(),
        request: serde_json::json!({"op": "set_target", "target_mib": target_mib}),
    }
}

impl Request {
    /// The request's `op` on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Snapshot { .. } => "snapshot",
            Request::Checkpoint { .. } => "checkpoint",
            Request::Stop => "stop",
            Request::Stats => "stats",
            Request::Device { .. } => "device",
            Request::SnapshotStream { .. } => "snapshot-stream",
            Request::Migrate { .. } => "migrate",
        }
    }
}

/// A request line as sent on the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiRequest {
    /// `pause`, `resume`, `snapshot`, `checkpoint`, `stop`, `balloon`, `stats`, `device` or
    /// `migrate`.
    pub op: String,
    /// Snapshot or checkpoint directory (`snapshot` and `checkpoint` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Resume after the snapshot (`snapshot` only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
    /// A full checkpoint, the start of a new chain (`checkpoint` only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
    /// The balloon's target size in MiB (`balloon` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_mib: Option<u64>,
    /// The device id (`device` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The device's own request (`device` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
    /// The destination, `host:port` (`migrate` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The migration key file, an absolute path (`migrate` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The downtime budget in milliseconds (`migrate` only; 30 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// The TLS identity (`migrate` only; plain TCP when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MigrationTls>,
    /// The twin to become at a cloud host (`migrate` only, with `tls` or to a `unix:` relay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<String>,
    /// The snapshot directory of the copy kept at the switch (`migrate` only, absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<PathBuf>,
    /// Clone rather than move: the guest runs on here (`migrate` only, with `twin`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clone: bool,
}

/// The downtime budget of a `migrate` line without `downtime_ms`, in milliseconds.
pub const DEFAULT_DOWNTIME_MS: u64 = 30;

/// Why a request line is refused before it reaches the VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not a JSON request object.
    #[error("bad request: {0}")]
    Syntax(String),
    /// `balloon` without its target or with other fields.
    #[error("balloon needs \"target_mib\" and nothing else")]
    BalloonTarget,
    /// `target_mib` on an op other than `balloon`.
    #[error("{0} takes no \"target_mib\"")]
    UnexpectedTarget(String),
    /// `snapshot` without an absolute directory.
    #[error("snapshot needs \"dir\": an absolute path")]
    SnapshotDir,
    /// `checkpoint` without an absolute directory, or `full` on another op.
    #[error("checkpoint needs \"dir\" (an absolute path) and may take \"full\", which only checkpoint takes")]
    CheckpointRequest,
    /// `dir` on an op other than `snapshot`.
    #[error("{0} takes no \"dir\"")]
    UnexpectedDir(String),
    /// `device` without its id and request, or `id`/`request` on another op.
    #[error("device needs \"id\" and \"request\", and only device takes them")]
    DeviceRequest,
    /// `migrate` without its destination and absolute key file, or their fields on another op.
    #[error(
        "migrate needs \"to\" (host:port) and \"key_file\" (an absolute path), may take \
         \"downtime_ms\", \"tls\" ({{\"cert\",\"key\",\"ca\"}}, absolute paths) and, with \
         \"tls\" or a unix:PATH relay, \"twin\" (a cloud host's twin), \"keep\" (an \
         absolute directory), with \
         \"twin\", \"clone\", and only migrate takes them"
    )]
    MigrateRequest,
    /// An op nobody serves.
    #[error("unknown op {0:?} (pause, resume, snapshot, checkpoint, stop, balloon, stats, device, migrate)")]
    UnknownOp(String),
}

impl ApiRequest {
    /// Parses one request line.
    pub fn parse_line(line: &str) -> Result<Request, RequestError> {
        let wire: ApiRequest =
            serde_json::from_str(line).map_err(|e| RequestError::Syntax(e.to_string()))?;
        Request::try_from(wire)
    }

    /// The request as one line, newline included (fails for a path that is not UTF-8).
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        let mut line = serde_json::to_string(self)?;
        line.push('\n');
        Ok(line)
    }
}

impl From<&Request> for ApiRequest {
    fn from(r: &Request) -> Self {
        let mut wire = ApiRequest {
            op: r.op().to_string(),
            dir: None,
            resume: false,
            full: false,
            target_mib: None,
            id: None,
            request: None,
            to: None,
            key_file: None,
            downtime_ms: None,
            tls: None,
            twin: None,
            keep: None,
            clone: false,
        };
        match r {
            Request::Snapshot { dir, resume } => {
                wire.dir = Some(dir.clone());
                wire.resume = *resume;
            }
            Request::Checkpoint { dir, full } => {
                wire.dir = Some(dir.clone());
                wire.full = *full;
            }
            Request::Device { id, request } => {
                wire.id = Some(id.clone());
                wire.request = Some(request.clone());
            }
            Request::Migrate {
                to,
                key_file,
                downtime_ms,
                tls,
                twin,
                keep,
                clone,
            } => {
                wire.clone = *clone;
                wire.to = Some(to.clone());
                wire.key_file = Some(key_file.clone());
                wire.downtime_ms = Some(*downtime_ms);
                wire.tls = tls.clone();
                wire.twin = twin.clone();
                wire.keep = keep.clone();
            }
            // No wire form: `snapshot-stream` is refused as an unknown op.
            Request::SnapshotStream { .. } => {}
            Request::Pause | Request::Resume | Request::Stop | Request::Stats => {}
        }
        wire
    }
}

impl TryFrom<ApiRequest> for Request {
    type Error = RequestError;

    fn try_from(r: ApiRequest) -> Result<Self, RequestError> {
        let migrate_fields = r.to.is_some()
            || r.key_file.is_some()
            || r.downtime_ms.is_some()
            || r.tls.is_some()
            || r.twin.is_some()
            || r.keep.is_some()
            || r.clone;
        if r.op == "migrate" {
            return match (r.to, r.key_file) {
                (Some(to), Some(key_file))
                    if key_file.is_absolute()
                        && !to.is_empty()
                        && r.dir.is_none()
                        && r.target_mib.is_none()
                        && r.id.is_none()
                        && r.request.is_none()
                        && !r.resume
                        && r.tls.as_ref().is_none_or(MigrationTls::is_absolute)
                        // A twin's request goes over TLS, or to a local relay that
                        // carries it on inside its own (`unix:PATH`).
                        && (r.twin.is_none() || r.tls.is_some() || to.starts_with("unix:"))
                        && r.keep.as_ref().is_none_or(|k| k.is_absolute())
                        && (!r.clone || r.twin.is_some()) =>
                {
                    Ok(Request::Migrate {
                        to,
                        key_file,
                        downtime_ms: r.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS),
                        tls: r.tls,
                        twin: r.twin,
                        keep: r.keep,
                        clone: r.clone,
                    })
                }
                _ => Err(RequestError::MigrateRequest),
            };
        }
        if migrate_fields {
            return Err(RequestError::MigrateRequest);
        }
        if r.op == "checkpoint" {
            return match r.dir {
                Some(dir)
                    if dir.is_absolute()
                        && !r.resume
                        && r.target_mib.is_none()
                        && r.id.is_none()
                        && r.request.is_none() =>
                {
                    Ok(Request::Checkpoint { dir, full: r.full })
                }
                _ => Err(RequestError::CheckpointRequest),
            };
        }
        if r.full {
            return Err(RequestError::CheckpointRequest);
        }
        match (r.op.as_str(), r.id, r.request) {
            ("device", Some(id), Some(request)) if r.dir.is_none() && r.target_mib.is_none() => {
                return Ok(Request::Device { id, request });
            }
            ("device", ..) | (_, Some(_), _) | (_, _, Some(_)) => {
                return Err(RequestError::DeviceRequest)
            }
            _ => {}
        }
        match (r.op.as_str(), r.target_mib) {
            ("balloon", Some(target_mib)) if r.dir.is_none() => {
                return Ok(balloon_target(target_mib));
            }
            ("balloon", _) => return Err(RequestError::BalloonTarget),
            (op, Some(_)) => return Err(RequestError::UnexpectedTarget(op.to_string())),
            _ => {}
        }
        match (r.op.as_str(), r.dir) {
            ("pause", None) => Ok(Request::Pause),
            ("resume", None) => Ok(Request::Resume),
            ("stop", None) => Ok(Request::Stop),
            ("stats", None) => Ok(Request::Stats),
            ("snapshot", Some(dir)) if dir.is_absolute() => Ok(Request::Snapshot {
                dir,
                resume: r.resume,
            }),
            ("snapshot", _) => Err(RequestError::SnapshotDir),
            (op @ ("pause" | "resume" | "stop" | "stats"), Some(_)) => {
                Err(RequestError::UnexpectedDir(op.to_string()))
            }
            (op, _) => Err(RequestError::UnknownOp(op.to_string())),
        }
    }
}

/// An answer line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Details on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
    /// The reason on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ApiResponse {
    /// The answer for the VM's result: `Ok(info)` or `Err(reason)`.
    pub fn from_result(result: Result<String, String>) -> Self {
        match result {
            Ok(info) => ApiResponse {
                ok: true,
                info: Some(info),
                error: None,
            },
            Err(e) => ApiResponse {
                ok: false,
                info: None,
                error: Some(e),
            },
        }
    }

    /// Parses an answer line into `Ok(info)` or `Err(reason)`.
    pub fn parse_line(line: &str) -> Result<Result<String, String>, serde_json::Error> {
        let resp: ApiResponse = serde_json::from_str(line.trim())?;
        Ok(resp.into_result())
    }

    /// `Ok(info)` (empty if absent) or `Err(reason)`.
    pub fn into_result(self) -> Result<String, String> {
        if self.ok {
            Ok(self.info.unwrap_or_default())
        } else {
            Err(self.error.unwrap_or_else(|| "refused".into()))
        }
    }

    /// The answer as one line, newline included.
    pub fn to_line(&self) -> String {
        // Strings and a bool always serialise.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}

/// The `stats` answer's `info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Whether guest RAM is offered to KSM.
    pub mergeable: bool,
    /// The balloon's state and the guest's statistics, if the VM has a balloon.
    pub balloon: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, RequestError> {
        ApiRequest::parse_line(s)
    }

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(parse(r#"{"op":"pause"}"#), Ok(Request::Pause));
        assert_eq!(parse(r#"{"op":"stop"}"#), Ok(Request::Stop));
        assert_eq!(
            parse(r#"{"op":"snapshot","dir":"/tmp/s","resume":true}"#),
            Ok(Request::Snapshot {
                dir: "/tmp/s".into(),
                resume: true
            })
        );
        assert_eq!(
            parse(r#"{"op":"snapshot"}"#),
            Err(RequestError::SnapshotDir)
        );
        assert_eq!(
            parse(r#"{"op":"snapshot","dir":"rel"}"#),
            Err(RequestError::SnapshotDir)
        );
        assert!(matches!(
            parse(r#"{"op":"explode"}"#),
            Err(RequestError::UnknownOp(_))
        ));
        assert!(matches!(
            parse(r#"{"op":"pause","extra":1}"#),
            Err(RequestError::Syntax(_))
        ));
        assert_eq!(
            parse(r#"{"op":"balloon","target_mib":128}"#),
            Ok(Request::Device {
                id: "balloon".into(),
                request: serde_json::json!({"op": "set_target", "target_mib": 128})
            })
        );
        assert_eq!(
            parse(r#"{"op":"device","id":"balloon","request":{"op":"stats"}}"#),
            Ok(Request::Device {
                id: "balloon".into(),
                request: serde_json::json!({"op": "stats"})
            })
        );
        for bad in [
            r#"{"op":"device","id":"balloon"}"#,
            r#"{"op":"device","request":{}}"#,
            r#"{"op":"device","id":"rng","request":{},"dir":"/x"}"#,
            r#"{"op":"pause","id":"rng"}"#,
            r#"{"op":"balloon","target_mib":1,"request":{}}"#,
        ] {
            assert_eq!(parse(bad), Err(RequestError::DeviceRequest), "{bad}");
        }
        assert!(matches!(
            parse(r#"{"op":"snapshot-stream","dir":"/x"}"#),
            Err(RequestError::UnknownOp(_))
        ));
        assert_eq!(parse(r#"{"op":"stats"}"#), Ok(Request::Stats));
        assert_eq!(
            parse(r#"{"op":"checkpoint","dir":"/c"}"#),
            Ok(Request::Checkpoint {
                dir: "/c".into(),
                full: false
            })
        );
        for bad in [
            r#"{"op":"checkpoint"}"#,
            r#"{"op":"checkpoint","dir":"rel"}"#,
            r#"{"op":"checkpoint","dir":"/c","resume":true}"#,
            r#"{"op":"snapshot","dir":"/c","full":true}"#,
            r#"{"op":"pause","full":true}"#,
        ] {
            assert_eq!(parse(bad), Err(RequestError::CheckpointRequest), "{bad}");
        }
        assert_eq!(
            parse(r#"{"op":"migrate","to":"h:1","key_file":"/k"}"#),
            Ok(Request::Migrate {
                to: "h:1".into(),
                key_file: "/k".into(),
                downtime_ms: DEFAULT_DOWNTIME_MS,
                tls: None,
                twin: None,
                keep: None,
                clone: false,
            })
        );
        // A twin's request to a local relay, which carries it on inside its own TLS.
        assert_eq!(
            parse(
                r#"{"op":"migrate","to":"unix:/r/cloud.sock","key_file":"/k","twin":"w","clone":true}"#
            ),
            Ok(Request::Migrate {
                to: "unix:/r/cloud.sock".into(),
                key_file: "/k".into(),
                downtime_ms: DEFAULT_DOWNTIME_MS,
                tls: None,
                twin: Some("w".into()),
                keep: None,
                clone: true,
            })
        );
        for bad in [
            r#"{"op":"migrate","to":"h:1"}"#,
            r#"{"op":"migrate","key_file":"/k"}"#,
            r#"{"op":"migrate","to":"h:1","key_file":"relative"}"#,
            r#"{"op":"migrate","to":"","key_file":"/k"}"#,
            r#"{"op":"migrate","to":"h:1","key_file":"/k","dir":"/x"}"#,
            r#"{"op":"migrate","to":"h:1","key_file":"/k","resume":true}"#,
            r#"{"op":"pause","to":"h:1"}"#,
            r#"{"op":"migrate","to":"h:1","key_file":"/k","tls":{"cert":"c","key":"/k","ca":"/a"}}"#,
            r#"{"op":"pause","tls":{"cert":"/c","key":"/k","ca":"/a"}}"#,
            r#"{"op":"migrate","to":"h:1","key_file":"/k","twin":"work"}"#,
            r#"{"op":"pause","twin":"work"}"#,
            r#"{"op":"migrate","to":"h:1","key_file":"/k","keep":"kept"}"#,
            r#"{"op":"stop","keep":"/kept"}"#,
            r#"{"op":"migrate","to":"h:1","key_file":"/k","clone":true}"#,
            r#"{"op":"pause","clone":true}"#,
            r#"{"op":"snapshot","dir":"/x","downtime_ms":5}"#,
        ] {
            assert_eq!(parse(bad), Err(RequestError::MigrateRequest), "{bad}");
        }
        assert_eq!(
            parse(r#"{"op":"balloon"}"#),
            Err(RequestError::BalloonTarget)
        );
        assert!(parse(r#"{"op":"balloon","target_mib":-1}"#).is_err());
        assert!(parse(r#"{"op":"balloon","target_mib":1,"dir":"/x"}"#).is_err());
        assert!(matches!(
            parse(r#"{"op":"pause","target_mib":1}"#),
            Err(RequestError::UnexpectedTarget(_))
        ));
        assert!(matches!(
            parse(r#"{"op":"stats","dir":"/x"}"#),
            Err(RequestError::UnexpectedDir(_))
        ));
    }

    #[test]
    fn every_request_round_trips_through_its_line() {
        let all = [
            Request::Pause,
            Request::Resume,
            Request::Stop,
            Request::Stats,
            balloon_target(64),
            Request::Device {
                id: "disk0".into(),
                request: serde_json::json!({"op": "x", "n": [1, 2]}),
            },
            Request::Snapshot {
                dir: "/run/0/snapshot".into(),
                resume: false,
            },
            Request::Snapshot {
                dir: "/s".into(),
                resume: true,
            },
            Request::Checkpoint {
                dir: "/r/ckpt-1".into(),
                full: true,
            },
            Request::Checkpoint {
                dir: "/r/ckpt-2".into(),
                full: false,
            },
            Request::Migrate {
                to: "10.0.0.2:7000".into(),
                key_file: "/etc/pv/migration.key".into(),
                downtime_ms: 50,
                tls: None,
                twin: None,
                keep: None,
                clone: false,
            },
            Request::Migrate {
                to: "[::1]:7000".into(),
                key_file: "/k".into(),
                downtime_ms: 30,
                tls: Some(MigrationTls {
                    cert: "/tls/host.pem".into(),
                    key: "/tls/host.key".into(),
                    ca: "/tls/ca.pem".into(),
                }),
                twin: Some("work".into()),
                keep: Some("/var/lib/handset/work/kept".into()),
                clone: false,
            },
            Request::Migrate {
                to: "cloud.example:7000".into(),
                key_file: "/k".into(),
                downtime_ms: 30,
                tls: Some(MigrationTls {
                    cert: "/tls/host.pem".into(),
                    key: "/tls/host.key".into(),
                    ca: "/tls/ca.pem".into(),
                }),
                twin: Some("work".into()),
                keep: None,
                clone: true,
            },
        ];
        for r in all {
            let line = ApiRequest::from(&r).to_line().unwrap();
            assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
            assert_eq!(ApiRequest::parse_line(&line), Ok(r));
        }
        assert_eq!(
            ApiRequest::from(&Request::Pause).to_line().unwrap(),
            "{\"op\":\"pause\"}\n"
        );
    }

    #[test]
    fn a_path_json_cannot_carry_is_an_error_not_an_empty_line() {
        use std::os::unix::ffi::OsStrExt;
        let dir = std::ffi::OsStr::from_bytes(b"/snap\xff").into();
        let r = Request::Snapshot { dir, resume: false };
        assert!(ApiRequest::from(&r).to_line().is_err());
    }

    #[test]
    fn answers_round_trip() {
        for result in [Ok("paused".to_string()), Err("no balloon".to_string())] {
            let line = ApiResponse::from_result(result.clone()).to_line();
            assert_eq!(ApiResponse::parse_line(&line).unwrap(), result);
        }
        assert_eq!(
            ApiResponse::parse_line(r#"{"ok":true}"#).unwrap(),
            Ok(String::new())
        );
        assert_eq!(
            ApiResponse::parse_line(r#"{"ok":false}"#).unwrap(),
            Err("refused".to_string())
        );
        assert!(ApiResponse::parse_line("nonsense").is_err());
        let stats: MemoryStats =
            serde_json::from_str(r#"{"memory_mib":256,"mergeable":false,"balloon":null}"#).unwrap();
        assert_eq!(stats.memory_mib, 256);
        assert!(stats.balloon.is_none());
    }
}
