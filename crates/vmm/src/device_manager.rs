//! The VM's virtio devices, owned by id.
//!
//! `DEVICE_TABLE` is the one place that turns the configuration into devices: each line
//! names a kind of device and builds every instance the configuration asks for, in the order
//! the guest sees them on the PCI bus. Each device gets a stable id derived from the
//! configuration: numbered kinds get `disk0`, `disk1`, `net0`..., single ones their name
//! (`vsock`, `rng`, `balloon`). Snapshots key each device's state by that id, and control
//! requests ([`crate::Request::Device`]) address a device by it.
//!
//! Adding a virtio device: its model in `crates/devices`, one line in `DEVICE_TABLE`, and
//! the setting in [`VmConfig`] that asks for it.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use devices::bus::lock;
use devices::pci::{PciRoot, VmHooks};
use devices::virtio::balloon::{Balloon, BalloonConfig};
use devices::virtio::block::Block;
use devices::virtio::control::{ControlError, DeviceControl};
use devices::virtio::net::Net;
use devices::virtio::pci::{VirtioPciDevice, VirtioPciState};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use devices::GuestMem;

use crate::config::{parse_mac, DiskConfig, NetConfig, VmConfig, VsockConfig};
use crate::Error;

/// A device model built from the configuration, or why it could not be.
type Built = Result<Box<dyn VirtioDevice>, String>;

/// One kind of virtio device: its id (or id prefix) and how the configuration builds it.
pub(crate) struct DeviceKind {
    /// The device's id, or the prefix of numbered ids.
    name: &'static str,
    /// Several instances, numbered from 0 (`disk0`, `disk1`), or at most one (`rng`).
    numbered: bool,
    /// Every instance the configuration asks for, in order.
    build: fn(&VmConfig) -> Vec<Built>,
}

impl DeviceKind {
    /// A kind with one instance per entry of a configuration list.
    const fn each(name: &'static str, build: fn(&VmConfig) -> Vec<Built>) -> Self {
        DeviceKind {
            name,
            numbered: true,
            build,
        }
    }

    /// A kind with at most one instance.
    const fn one(name: &'static str, build: fn(&VmConfig) -> Vec<Built>) -> Self {
        DeviceKind {
            name,
            numbered: false,
            build,
        }
    }
}

/// Every virtio device kind, in PCI order: configuration in, constructors out.
pub(crate) const DEVICE_TABLE: &[DeviceKind] = &[
    DeviceKind::each("disk", |c| c.disks.iter().map(block).collect()),
    DeviceKind::each("net", |c| c.net.iter().map(net).collect()),
    DeviceKind::one("vsock", |c| c.vsock.iter().map(vsock).collect()),
    DeviceKind::one("rng", |c| when(c.rng, || plain(Rng::new()))),
    DeviceKind::one("balloon", |c| when(c.balloon, || balloon(c))),
];

/// A device model that cannot fail to build.
fn plain(device: impl VirtioDevice + 'static) -> Built {
    Ok(Box::new(device))
}

/// A device model, or why it could not be built.
fn built<D: VirtioDevice + 'static, E: std::fmt::Display>(made: Result<D, E>) -> Built {
    made.map(|d| Box::new(d) as Box<dyn VirtioDevice>)
        .map_err(|e| e.to_string())
}

/// One device if `on`.
fn when(on: bool, make: impl FnOnce() -> Built) -> Vec<Built> {
    if on {
        vec![make()]
    } else {
        Vec::new()
    }
}

fn block(d: &DiskConfig) -> Built {
    built(Block::new(&d.path, d.read_only, None))
}

fn vsock(v: &VsockConfig) -> Built {
    built(Vsock::new(v.cid, &v.socket))
}

fn balloon(c: &VmConfig) -> Built {
    built(Balloon::new(c.memory_mib << 20, BalloonConfig::default()))
}

fn net(n: &NetConfig) -> Built {
    let mac = n
        .mac
        .as_deref()
        .map(parse_mac)
        .transpose()
        .map_err(|e| e.to_string())?;
    built(Net::new_tap(&n.tap, mac))
}

/// The ids of `n` devices of `kind`.
fn ids_of(kind: &DeviceKind, n: usize) -> Vec<String> {
    if kind.numbered {
        (0..n).map(|i| format!("{}{i}", kind.name)).collect()
    } else {
        (0..n).map(|_| kind.name.to_string()).collect()
    }
}

/// One device as a snapshot stores it: its id and its virtio-pci state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DeviceSection {
    pub id: String,
    pub state: VirtioPciState,
}

/// Why a control request did not reach a device or the device refused it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceRequestError {
    /// No device has this id.
    #[error("this VM has no {id} device (it has: {known})")]
    UnknownDevice { id: String, known: String },
    /// The device refused the request.
    #[error("device {id}: {source}")]
    Control {
        id: String,
        #[source]
        source: ControlError,
    },
}

struct Managed {
    id: String,
    pci: Arc<Mutex<VirtioPciDevice>>,
    control: Option<Arc<dyn DeviceControl>>,
}

/// The VM's virtio devices by id: built from `DEVICE_TABLE`, paused, resumed, saved,
/// restored and sent control requests through here.
pub(crate) struct DeviceManager {
    devices: Vec<Managed>,
}

impl DeviceManager {
    /// Builds every device `cfg` asks for on `root`, in table order.
    pub fn build(
        cfg: &VmConfig,
        mem: &GuestMem,
        hooks: &Arc<dyn VmHooks>,
        root: &Arc<Mutex<PciRoot>>,
    ) -> Result<DeviceManager, Error> {
        let mut devices = Vec::new();
        for kind in DEVICE_TABLE {
            let built = (kind.build)(cfg);
            for (id, made) in ids_of(kind, built.len()).into_iter().zip(built) {
                let dev_err = |reason: String| Error::Device {
                    name: id.clone(),
                    reason,
                };
                let dev = made.map_err(dev_err)?;
                let control = dev.control();
                let pci = VirtioPciDevice::new(dev, mem.clone(), hooks.clone())
                    .map_err(|e| dev_err(e.to_string()))?;
                let pci = Arc::new(Mutex::new(pci));
                lock(root)
                    .add_device(pci.clone())
                    .map_err(|e| dev_err(e.to_string()))?;
                devices.push(Managed { id, pci, control });
            }
        }
        Ok(DeviceManager { devices })
    }

    /// The device ids, in PCI order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.devices.iter().map(|d| d.id.as_str())
    }

    /// Whether a device has this id.
    pub fn has(&self, id: &str) -> bool {
        self.ids().any(|i| i == id)
    }

    /// Quiesces every device's worker (the vCPUs are already parked).
    pub fn pause(&self) {
        for d in &self.devices {
            lock(&d.pci).pause();
        }
    }

    /// Lets every device's worker run again.
    pub fn resume(&self) {
        for d in &self.devices {
            lock(&d.pci).resume();
        }
    }

    /// Every device's state, keyed by id (devices paused).
    pub fn save(&self) -> Vec<DeviceSection> {
        self.devices
            .iter()
            .map(|d| DeviceSection {
                id: d.id.clone(),
                state: lock(&d.pci).save_state(),
            })
            .collect()
    }

    /// Puts each device back in its saved state: every device needs exactly one section and
    /// every section a device.
    pub fn restore(&self, sections: &[DeviceSection]) -> Result<(), Error> {
        for s in sections {
            if !self.has(&s.id) {
                return Err(Error::Snapshot(format!(
                    "the snapshot has a device {} this configuration lacks",
                    s.id
                )));
            }
        }
        for d in &self.devices {
            let mut saved = sections.iter().filter(|s| s.id == d.id);
            let (Some(saved), None) = (saved.next(), saved.next()) else {
                return Err(Error::Snapshot(format!(
                    "the snapshot has no single state for device {}",
                    d.id
                )));
            };
            lock(&d.pci)
                .restore_state(&saved.state)
                .map_err(|e| Error::Device {
                    name: d.id.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Gives ids to states saved by position (snapshots written before devices had ids; the
    /// table keeps the old order, so position `i` is the `i`-th device).
    pub fn name_positional(
        &self,
        saved: Vec<(usize, VirtioPciState)>,
    ) -> Result<Vec<DeviceSection>, Error> {
        if saved.len() != self.devices.len() || saved.iter().enumerate().any(|(i, s)| s.0 != i) {
            return Err(Error::Snapshot(format!(
                "the snapshot has {} virtio devices, the configuration {}",
                saved.len(),
                self.devices.len()
            )));
        }
        Ok(self
            .devices
            .iter()
            .zip(saved)
            .map(|(d, (_, state))| DeviceSection {
                id: d.id.clone(),
                state,
            })
            .collect())
    }

    /// After a restore, before the guest runs: let each device look at its queues again.
    pub fn renotify(&self) {
        for d in &self.devices {
            lock(&d.pci).renotify_queues();
        }
    }

    /// Sends `request` to device `id` and returns its answer.
    pub fn control(
        &self,
        id: &str,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, DeviceRequestError> {
        let Some(d) = self.devices.iter().find(|d| d.id == id) else {
            let known: Vec<&str> = self.ids().collect();
            return Err(DeviceRequestError::UnknownDevice {
                id: id.to_string(),
                known: if known.is_empty() {
                    "no devices".into()
                } else {
                    known.join(", ")
                },
            });
        };
        let control = d.control.as_ref().ok_or(DeviceRequestError::Control {
            id: id.to_string(),
            source: ControlError::Unsupported,
        })?;
        control
            .control(request)
            .map_err(|source| DeviceRequestError::Control {
                id: id.to_string(),
                source,
            })
    }
}
