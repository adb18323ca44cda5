//! The VM's virtio devices, owned by id.
//!
//! `DEVICE_TABLE` is the one place that turns the configuration into devices: each line
//! names a kind of device and builds every instance the configuration asks for, in the order
//! the guest sees them on the PCI bus. Each device gets a stable id derived from the
//! configuration: numbered kinds get `disk0`, `disk1`, `net0`..., single ones their name
//! (`vsock`, `rng`, `balloon`, `gpu`, `keyboard`, `touch`). Snapshots key each device's state by that id, and control
//! requests ([`crate::Request::Device`]) address a device by it.
//!
//! Adding a virtio device: its model in `crates/devices`, one line in `DEVICE_TABLE`, and
//! the setting in [`VmConfig`] that asks for it.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use devices::bus::lock;
use devices::pci::{PciRoot, VmHooks};
use devices::virtio::balloon::{Balloon, BalloonConfig};
use devices::virtio::block::crypt::DiskKey;
use devices::virtio::block::Block;
use devices::virtio::control::{ControlError, DeviceControl};
use devices::virtio::gpu::Gpu;
use devices::virtio::input::{Input, InputKind};
use devices::virtio::net::{Filter, IpNet, Net, Proto, Rule, Verdict};
use devices::virtio::pci::{VirtioPciDevice, VirtioPciState};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use devices::GuestMem;

use crate::config::{parse_mac, DiskConfig, GpuConfig, NetConfig, VmConfig, VsockConfig};
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
    DeviceKind::one("gpu", |c| c.gpu.iter().map(gpu).collect()),
    DeviceKind::one("keyboard", |c| when(c.input, || input(InputKind::Keyboard))),
    DeviceKind::one("touch", |c| when(c.input, || input(touch_screen(c)))),
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
    let block = Block::new(&d.path, d.read_only, None).map_err(|e| e.to_string())?;
    match (d.encrypted, &d.key) {
        (false, None) => Ok(Box::new(block)),
        (true, Some(key)) => {
            let key = DiskKey::from_slice(key.as_bytes()).map_err(|e| e.to_string())?;
            Ok(Box::new(block.with_encryption(&key)))
        }
        (true, None) => Err("the disk is encrypted and no key was given".into()),
        (false, Some(_)) => Err("a key was given for a disk that is not encrypted".into()),
    }
}

fn vsock(v: &VsockConfig) -> Built {
    built(Vsock::new(v.cid, &v.socket))
}

fn balloon(c: &VmConfig) -> Built {
    built(Balloon::new(c.memory_mib << 20, BalloonConfig::default()))
}

fn gpu(g: &GpuConfig) -> Built {
    built(Gpu::new(devices::virtio::gpu::GpuConfig {
        width: g.width,
        height: g.height,
        max_host_bytes: u64::from(g.memory_mib) << 20,
        ..Default::default()
    }))
}

fn input(kind: InputKind) -> Built {
    built(Input::new(kind))
}

/// A ten-finger touch screen the size of the display (or of the default display).
fn touch_screen(c: &VmConfig) -> InputKind {
    let g = c.gpu.unwrap_or_default();
    InputKind::Touch {
        width: g.width,
        height: g.height,
        slots: 10,
    }
}

fn net(n: &NetConfig) -> Built {
    let mac = n
        .mac
        .as_deref()
        .map(parse_mac)
        .transpose()
        .map_err(|e| e.to_string())?;
    let filter = n.filter.as_ref().map(net_filter).transpose()?;
    let net = Net::new_tap(&n.tap, mac).map_err(|e| e.to_string())?;
    Ok(Box::new(match filter {
        Some(f) => net.with_filter(f),
        None => net,
    }))
}

/// The device's network policy from its configuration.
fn net_filter(c: &vmm_api::config::NetFilterConfig) -> Result<Filter, String> {
    use vmm_api::config::{FilterAction, FilterProtocol};
    let verdict = |a: FilterAction| match a {
        FilterAction::Allow => Verdict::Allow,
        FilterAction::Deny => Verdict::Deny,
    };
    let rules = c
        .rules
        .iter()
        .map(|r| {
            Ok(Rule {
                verdict: verdict(r.action),
                net: r.cidr.as_deref().map(IpNet::parse).transpose()?,
                name: r
                    .name
                    .as_deref()
                    .map(devices::virtio::net::NamePattern::parse)
                    .transpose()?,
                proto: match r.protocol {
                    FilterProtocol::Any => Proto::Any,
                    FilterProtocol::Tcp => Proto::Tcp,
                    FilterProtocol::Udp => Proto::Udp,
                    FilterProtocol::Icmp => Proto::Icmp,
                },
                ports: match r.ports {
                    Some([first, last]) if first > last => {
                        return Err(format!("ports {first}-{last}: the first is above the last"))
                    }
                    p => p.map(|[first, last]| (first, last)),
                },
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let dns_servers = c
        .dns_servers
        .iter()
        .map(|s| {
            s.parse::<std::net::IpAddr>()
                .map_err(|_| format!("dns server {s:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if dns_servers.is_empty() && rules.iter().any(|r| r.name.is_some()) {
        return Err("a rule by name needs dns_servers".into());
    }
    Ok(Filter::new(verdict(c.default), rules).with_dns(dns_servers))
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

/// The host's typed handles on the VM's display and input devices.
#[derive(Clone)]
pub struct ScreenHandles {
    /// The gpu's scanout.
    pub display: devices::virtio::gpu::Display,
    /// The keyboard, if the VM has input devices.
    pub keyboard: Option<devices::virtio::input::InputHandle>,
    /// The touch screen, if the VM has input devices.
    pub touch: Option<devices::virtio::input::InputHandle>,
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
            if !kind.numbered && built.len() > 1 {
                return Err(Error::Config(format!("more than one {} device", kind.name)));
            }
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

    /// The display and input handles, if the VM has a gpu.
    pub fn screen(&self) -> Option<ScreenHandles> {
        Some(ScreenHandles {
            display: self.typed_handle("gpu")?,
            keyboard: self.typed_handle("keyboard"),
            touch: self.typed_handle("touch"),
        })
    }

    /// The written-chunk bitmap of each disk, in configuration order.
    pub fn disk_dirty_chunks(&self) -> Vec<Arc<devices::virtio::block::DirtyChunks>> {
        (0..)
            .map_while(|i| {
                self.typed_handle::<devices::virtio::block::DiskHandle>(&format!("disk{i}"))
            })
            .map(|h| h.0)
            .collect()
    }

    /// Device `id`'s control handle as its own type.
    fn typed_handle<T: Clone + 'static>(&self, id: &str) -> Option<T> {
        let d = self.devices.iter().find(|d| d.id == id)?;
        d.control.as_ref()?.as_any()?.downcast_ref::<T>().cloned()
    }

    /// `{"op":"set_filter","filter":F}` for a network device: `F` (a [`NetFilterConfig`],
    /// or null for none) replaces its policy while the guest runs; the flows the old one
    /// allowed are forgotten ([`devices::virtio::net::FilterHandle::replace`]). Answers
    /// `{"installed":bool,"flows_forgotten":N}`.
    ///
    /// [`NetFilterConfig`]: vmm_api::config::NetFilterConfig
    fn set_filter(
        &self,
        id: &str,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, DeviceRequestError> {
        let err = |source| DeviceRequestError::Control {
            id: id.to_string(),
            source,
        };
        let handle: devices::virtio::net::FilterHandle = self
            .typed_handle(id)
            .ok_or_else(|| err(ControlError::Unsupported))?;
        let fields = request.as_object().map_or(0, serde_json::Map::len);
        let config = match request.get("filter") {
            Some(f) if fields == 2 => f.clone(),
            _ => {
                return Err(err(ControlError::BadRequest(
                    "set_filter takes exactly {\"op\":\"set_filter\",\"filter\":...}".into(),
                )))
            }
        };
        let config: Option<vmm_api::config::NetFilterConfig> = serde_json::from_value(config)
            .map_err(|e| err(ControlError::BadRequest(format!("bad filter: {e}"))))?;
        let filter = config
            .as_ref()
            .map(net_filter)
            .transpose()
            .map_err(|e| err(ControlError::BadRequest(format!("bad filter: {e}"))))?;
        let forgotten = handle.replace(filter);
        Ok(serde_json::json!({"installed": handle.installed(), "flows_forgotten": forgotten}))
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

    /// Sends `request` to device `id` and returns its answer. Every device answers
    /// `{"op":"counters"}` with its [`CounterValues`](devices::virtio::CounterValues)
    /// (requests, bytes, errors, interrupts); anything else goes to the device's own control.
    pub fn control(
        &self,
        id: &str,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, DeviceRequestError> {
        let Some(d) = self.devices.iter().find(|d| d.id == id) else {
            // The serial port is served by the VM itself, and always there.
            let known: Vec<&str> = self
                .ids()
                .chain([vmm_api::control::SERIAL_DEVICE_ID])
                .collect();
            return Err(DeviceRequestError::UnknownDevice {
                id: id.to_string(),
                known: known.join(", "),
            });
        };
        if *request == serde_json::json!({ "op": "counters" }) {
            let counters = lock(&d.pci).counters();
            return serde_json::to_value(counters).map_err(|e| DeviceRequestError::Control {
                id: id.to_string(),
                source: ControlError::Refused(e.to_string()),
            });
        }
        if request.get("op") == Some(&serde_json::json!("set_filter")) {
            return self.set_filter(id, request);
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::config::DiskConfig;

    /// Hooks that accept everything (no KVM).
    #[derive(Default)]
    struct NoHooks(AtomicU32);

    impl VmHooks for NoHooks {
        fn register_ioevent(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn unregister_ioevent(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn allocate_msi(&self, _: &EventFd) -> std::io::Result<u32> {
            Ok(24 + self.0.fetch_add(1, Ordering::Relaxed))
        }
        fn set_msi_route(&self, _: u32, _: u64, _: u32, _: u32, _: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn manager(cfg: &VmConfig) -> Result<DeviceManager, Error> {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let hooks: Arc<dyn VmHooks> = Arc::new(NoHooks::default());
        let root = Arc::new(Mutex::new(PciRoot::new(0xc000_0000, 0x1000_0000)));
        DeviceManager::build(cfg, &mem, &hooks, &root)
    }

    /// A configuration with `disks` disks (image files named after `tag`), rng and balloon.
    fn config(tag: &str, disks: usize) -> (VmConfig, Vec<std::path::PathBuf>) {
        let mut cfg = VmConfig::new("k".into());
        let mut paths = Vec::new();
        for i in 0..disks {
            let p = std::env::temp_dir()
                .join(format!("pv-devmgr-{tag}-{}-{i}.img", std::process::id()));
            std::fs::write(&p, vec![0u8; 4096]).unwrap();
            cfg.disks.push(DiskConfig {
                path: p.clone(),
                read_only: true,
                encrypted: false,
                key: None,
            });
            paths.push(p);
        }
        cfg.rng = true;
        cfg.balloon = true;
        (cfg, paths)
    }

    #[test]
    fn an_encrypted_disk_needs_its_key_and_the_key_stays_out_of_the_config_file() {
        let (mut cfg, paths) = config("crypt", 1);
        let key: [u8; 64] = std::array::from_fn(|i| u8::try_from(i).unwrap());
        let key = vmm_api::config::DiskKeyMaterial::new(zeroize::Zeroizing::new(key));
        cfg.disks[0].encrypted = true;
        let err = manager(&cfg).err().unwrap().to_string();
        assert!(err.contains("disk0") && err.contains("no key"), "{err}");
        cfg.disks[0].key = Some(key.clone());
        assert!(manager(&cfg).unwrap().has("disk0"));
        // The configuration as written to vm.toml or a snapshot says "encrypted", holds no key.
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"encrypted\":true"), "{json}");
        let back: VmConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.disks[0].key, None);
        let debug = format!("{cfg:?}");
        assert!(
            debug.contains("DiskKeyMaterial(..)") && !debug.contains("62, 63"),
            "{debug}"
        );
        // A key for a disk that is not encrypted is a mistake, not ignored.
        cfg.disks[0].encrypted = false;
        let err = manager(&cfg).err().unwrap().to_string();
        assert!(err.contains("not encrypted"), "{err}");
        paths.iter().for_each(|p| drop(std::fs::remove_file(p)));
    }

    #[test]
    fn ids_follow_the_table_and_the_configuration() {
        let (cfg, paths) = config("ids", 2);
        let m = manager(&cfg).unwrap();
        assert_eq!(
            m.ids().collect::<Vec<_>>(),
            ["disk0", "disk1", "rng", "balloon"]
        );
        assert!(m.has("disk1") && !m.has("disk2"));
        let e = manager(&VmConfig::new("k".into())).unwrap();
        assert_eq!(e.ids().count(), 0);
        // A device that cannot be built names its id.
        let mut bad = cfg.clone();
        bad.disks[1].path = "/nonexistent/pv.img".into();
        let err = manager(&bad).err().unwrap().to_string();
        assert!(
            err.contains("disk1") && err.contains("/nonexistent/pv.img"),
            "{err}"
        );
        paths.iter().for_each(|p| drop(std::fs::remove_file(p)));
    }

    #[test]
    fn requests_reach_the_device_by_id() {
        let (cfg, paths) = config("requests", 1);
        let m = manager(&cfg).unwrap();
        let set = serde_json::json!({"op": "set_target", "target_mib": 1});
        assert_eq!(
            m.control("balloon", &set).unwrap(),
            serde_json::json!({"target_mib": 1})
        );
        let e = m.control("net0", &set).unwrap_err();
        assert!(matches!(e, DeviceRequestError::UnknownDevice { .. }));
        assert_eq!(
            e.to_string(),
            "this VM has no net0 device (it has: disk0, rng, balloon, serial)"
        );
        // A disk takes requests (its dirty chunks) but not the balloon's.
        assert!(matches!(
            m.control("disk0", &set),
            Err(DeviceRequestError::Control {
                source: ControlError::BadRequest(_),
                ..
            })
        ));
        assert!(matches!(
            m.control("rng", &set),
            Err(DeviceRequestError::Control {
                source: ControlError::Unsupported,
                ..
            })
        ));
        paths.iter().for_each(|p| drop(std::fs::remove_file(p)));
    }

    #[test]
    fn every_device_answers_with_its_counters() {
        let (cfg, paths) = config("counters", 1);
        let m = manager(&cfg).unwrap();
        let ask = serde_json::json!({"op": "counters"});
        for id in ["disk0", "rng", "balloon"] {
            let answer = m.control(id, &ask).unwrap();
            // Nothing ran yet: every counter is there and zero.
            assert_eq!(
                answer,
                serde_json::json!({"requests": 0, "bytes": 0, "errors": 0, "interrupts": 0}),
                "{id}"
            );
        }
        assert!(matches!(
            m.control("net0", &ask),
            Err(DeviceRequestError::UnknownDevice { .. })
        ));
        paths.iter().for_each(|p| drop(std::fs::remove_file(p)));
    }

    #[test]
    fn restore_wants_exactly_one_section_per_device() {
        let (cfg, paths) = config("restore", 1);
        let m = manager(&cfg).unwrap();
        let saved = m.save();
        let ids: Vec<&str> = saved.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["disk0", "rng", "balloon"]);
        m.restore(&saved).unwrap();
        // Sections in another order still find their devices.
        let mut shuffled = saved.clone();
        shuffled.reverse();
        m.restore(&shuffled).unwrap();

        let missing = &saved[..2];
        assert!(m
            .restore(missing)
            .unwrap_err()
            .to_string()
            .contains("balloon"));
        let mut extra = saved.clone();
        extra.push(DeviceSection {
            id: "net0".into(),
            state: saved[0].state.clone(),
        });
        assert!(m.restore(&extra).unwrap_err().to_string().contains("net0"));
        let mut twice = saved.clone();
        twice.push(saved[1].clone());
        assert!(m.restore(&twice).unwrap_err().to_string().contains("rng"));
        // A state of another device type under a known id is refused by the device.
        let mut swapped = saved.clone();
        swapped[1].state = saved[0].state.clone();
        assert!(m.restore(&swapped).is_err());

        // Positional sections (older snapshots) get the ids of the devices in order.
        let positional: Vec<(usize, VirtioPciState)> = saved
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.state.clone()))
            .collect();
        let named = m.name_positional(positional.clone()).unwrap();
        assert_eq!(
            named.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["disk0", "rng", "balloon"]
        );
        assert!(m.name_positional(positional[..2].to_vec()).is_err());
        paths.iter().for_each(|p| drop(std::fs::remove_file(p)));
    }
}
