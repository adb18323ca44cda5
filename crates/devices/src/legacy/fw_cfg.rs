//! A minimal QEMU firmware configuration device (fw_cfg) on ports 0x510-0x511: how SeaBIOS and
//! OVMF learn the machine they run on (memory map, vCPU count, ACPI tables).
//!
//! Only the traditional port interface: a 16-bit write to the selector (offset 0) picks an
//! item and rewinds it; each byte read from the data port (offset 1) returns the next byte of
//! the item, 0 past its end or for an item that does not exist. Writes to the data port are
//! ignored (items are read-only) and the DMA interface is not offered (the `ID` item says so).
//! Named items ("files") are listed in the file directory item, as QEMU does. Snapshots keep
//! the selected item and the read position ([`FwCfgState`]); the items are made again from the
//! VM's configuration.

use std::collections::BTreeMap;

use crate::bus::BusDevice;

/// The selector port, relative to the device's base port 0x510.
const SELECTOR_OFFSET: u64 = 0;
/// The data port, relative to the base.
const DATA_OFFSET: u64 = 1;

/// Item keys QEMU defines (docs/specs/fw_cfg.rst).
pub mod key {
    /// "QEMU": tells firmware the device is there.
    pub const SIGNATURE: u16 = 0x00;
    /// Interface features: bit 0 traditional (always), bit 1 DMA.
    pub const ID: u16 = 0x01;
    /// Non-zero: no graphics, SeaBIOS puts its console on the serial port.
    pub const NOGRAPHIC: u16 = 0x04;
    /// Number of vCPUs present at boot (u16 little-endian).
    pub const NB_CPUS: u16 = 0x05;
    /// Most vCPUs the machine can have (u16 little-endian).
    pub const MAX_CPUS: u16 = 0x0f;
    /// The file directory.
    pub const FILE_DIR: u16 = 0x19;
    /// The first key given to a file.
    pub const FILE_FIRST: u16 = 0x20;
}

/// The longest file name, including its terminating NUL.
pub const FILE_NAME_MAX: usize = 56;
/// Most files the device holds (keys 0x20 up to below 0x4000, where QEMU's write flag lives).
pub const MAX_FILES: usize = 0x1000;

/// Why a file cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FwCfgError {
    /// The name is empty, too long or contains a NUL.
    #[error("fw_cfg file name {0:?} must be 1-55 bytes without NUL")]
    BadName(String),
    /// A file with this name exists.
    #[error("fw_cfg file {0:?} is already there")]
    Duplicate(String),
    /// No key is left.
    #[error("too many fw_cfg files (at most {MAX_FILES})")]
    TooManyFiles,
    /// A file larger than 4 GiB cannot be described.
    #[error("fw_cfg file {0:?} is too large")]
    TooLarge(String),
}

/// What a snapshot keeps of the device: the selected item and the read position in it (a guest
/// that paused in the middle of reading an item reads on where it stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FwCfgState {
    /// The selected item's key (one the device lacks reads as zeros).
    pub selected: u16,
    /// The next byte read from the item.
    pub position: u64,
}

/// The fw_cfg device: items by key, the selected one and the read position in it.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selected: u16,
    position: usize,
}

impl FwCfg {
    /// A device holding the signature, the interface id (traditional only), the vCPU count
    /// and "no graphics".
    pub fn new(nr_vcpus: u16) -> Self {
        let mut items = BTreeMap::new();
        items.insert(key::SIGNATURE, b"QEMU".to_vec());
        items.insert(key::ID, 1u32.to_le_bytes().to_vec());
        items.insert(key::NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        items.insert(key::NB_CPUS, nr_vcpus.to_le_bytes().to_vec());
        items.insert(key::MAX_CPUS, nr_vcpus.to_le_bytes().to_vec());
        let mut cfg = FwCfg {
            items,
            files: Vec::new(),
            selected: 0,
            position: 0,
        };
        cfg.items.insert(key::FILE_DIR, cfg.file_dir());
        cfg
    }

    /// Adds the file `name` with `data`, listed in the file directory.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.is_empty() || name.len() >= FILE_NAME_MAX || name.contains('\0') {
            return Err(FwCfgError::BadName(name.to_string()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Duplicate(name.to_string()));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(name.to_string()));
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        let index = u16::try_from(self.files.len()).map_err(|_| FwCfgError::TooManyFiles)?;
        let select = key::FILE_FIRST + index;
        self.items.insert(select, data);
        self.files.push((name.to_string(), select));
        self.items.insert(key::FILE_DIR, self.file_dir());
        Ok(())
    }

    /// The file directory: a big-endian count, then per file its big-endian size and key, two
    /// reserved bytes and its NUL-padded name, sorted by name as QEMU does.
    fn file_dir(&self) -> Vec<u8> {
        let mut files: Vec<&(String, u16)> = self.files.iter().collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let count = u32::try_from(files.len()).unwrap_or(u32::MAX);
        let mut dir = count.to_be_bytes().to_vec();
        for (name, select) in files {
            let size = self.items.get(select).map_or(0, Vec::len);
            dir.extend_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_be_bytes());
            dir.extend_from_slice(&select.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut padded = [0u8; FILE_NAME_MAX];
            padded[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&padded);
        }
        dir
    }

    /// The selected item and read position, for a snapshot.
    pub fn save_state(&self) -> FwCfgState {
        FwCfgState {
            selected: self.selected,
            position: u64::try_from(self.position).unwrap_or(u64::MAX),
        }
    }

    /// Selects the item of `state` at its read position. Any key and position are accepted:
    /// a missing item, or a position past the item's end, reads as zeros, as it did before
    /// the snapshot (the position is kept no further than the end, which reads the same).
    pub fn restore_state(&mut self, state: &FwCfgState) {
        let len = self.items.get(&state.selected).map_or(0, Vec::len);
        self.selected = state.selected;
        self.position = usize::try_from(state.position).map_or(len, |p| p.min(len));
    }

    fn next_byte(&mut self) -> u8 {
        let byte = self
            .items
            .get(&self.selected)
            .and_then(|item| item.get(self.position).copied())
            .unwrap_or(0);
        self.position = self.position.saturating_add(1);
        byte
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // Every byte of a wider or repeated (`rep insb`) read is the next byte of the item.
            DATA_OFFSET => data.iter_mut().for_each(|b| *b = self.next_byte()),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != SELECTOR_OFFSET {
            return;
        }
        let mut key = [0u8; 2];
        let n = data.len().min(2);
        key[..n].copy_from_slice(&data[..n]);
        self.selected = u16::from_le_bytes(key);
        self.position = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(cfg: &mut FwCfg, key: u16) {
        cfg.write(SELECTOR_OFFSET, &key.to_le_bytes());
    }

    fn read(cfg: &mut FwCfg, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        cfg.read(DATA_OFFSET, &mut out);
        out
    }

    #[test]
    fn signature_id_and_cpus_read_back_byte_by_byte() {
        let mut cfg = FwCfg::new(3);
        select(&mut cfg, key::SIGNATURE);
        let sig: Vec<u8> = (0..4).map(|_| read(&mut cfg, 1)[0]).collect();
        assert_eq!(sig, b"QEMU");
        select(&mut cfg, key::ID);
        assert_eq!(
            read(&mut cfg, 4),
            [1, 0, 0, 0],
            "traditional interface only"
        );
        select(&mut cfg, key::NB_CPUS);
        assert_eq!(read(&mut cfg, 2), [3, 0]);
    }

    #[test]
    fn reads_past_the_end_or_of_a_missing_key_are_zero_and_selecting_rewinds() {
        let mut cfg = FwCfg::new(1);
        select(&mut cfg, key::SIGNATURE);
        assert_eq!(read(&mut cfg, 6), b"QEMU\0\0");
        assert_eq!(read(&mut cfg, 2), [0, 0]);
        select(&mut cfg, key::SIGNATURE);
        assert_eq!(read(&mut cfg, 1), b"Q");
        select(&mut cfg, 0x7777);
        assert_eq!(read(&mut cfg, 3), [0, 0, 0]);
        // Writes to the data port change nothing.
        cfg.write(DATA_OFFSET, &[9, 9]);
        select(&mut cfg, key::SIGNATURE);
        assert_eq!(read(&mut cfg, 4), b"QEMU");
    }

    #[test]
    fn files_are_listed_in_the_directory_by_name_with_their_key_and_size() {
        let mut cfg = FwCfg::new(1);
        cfg.add_file("etc/e820", vec![1; 40]).unwrap();
        cfg.add_file("etc/acpi/rsdp", vec![2; 36]).unwrap();
        select(&mut cfg, key::FILE_DIR);
        let dir = read(&mut cfg, 4 + 2 * 64);
        assert_eq!(&dir[..4], &2u32.to_be_bytes());
        let entry = |i: usize| &dir[4 + i * 64..4 + (i + 1) * 64];
        // Sorted by name: etc/acpi/rsdp (key 0x21) first.
        assert_eq!(&entry(0)[..4], &36u32.to_be_bytes());
        assert_eq!(&entry(0)[4..6], &0x21u16.to_be_bytes());
        assert_eq!(&entry(0)[8..21], b"etc/acpi/rsdp");
        assert!(entry(0)[21..].iter().all(|&b| b == 0));
        assert_eq!(&entry(1)[..4], &40u32.to_be_bytes());
        assert_eq!(&entry(1)[4..6], &0x20u16.to_be_bytes());
        select(&mut cfg, 0x20);
        assert_eq!(read(&mut cfg, 41), [vec![1; 40], vec![0]].concat());
    }

    #[test]
    fn a_restored_device_reads_on_where_the_saved_one_stopped() {
        let make = || {
            let mut cfg = FwCfg::new(2);
            cfg.add_file("etc/e820", (0..40).collect()).unwrap();
            cfg
        };
        let mut a = make();
        select(&mut a, 0x20);
        assert_eq!(read(&mut a, 3), [0, 1, 2]);
        let saved = a.save_state();
        assert_eq!(
            saved,
            FwCfgState {
                selected: 0x20,
                position: 3
            }
        );
        // Through the snapshot's encoding, into a new device that has read nothing.
        let json = serde_json::to_vec(&saved).unwrap();
        let mut b = make();
        b.restore_state(&serde_json::from_slice(&json).unwrap());
        assert_eq!(read(&mut b, 3), [3, 4, 5]);
        assert_eq!(b.save_state().position, 6);

        // A position past the end, or a key the device lacks, reads zeros and never panics.
        b.restore_state(&FwCfgState {
            selected: 0x20,
            position: u64::MAX,
        });
        assert_eq!(read(&mut b, 2), [0, 0]);
        b.restore_state(&FwCfgState {
            selected: 0x3fff,
            position: 7,
        });
        assert_eq!(read(&mut b, 2), [0, 0]);
        select(&mut b, key::SIGNATURE);
        assert_eq!(read(&mut b, 4), b"QEMU");
    }

    #[test]
    fn bad_or_duplicate_names_are_refused() {
        let mut cfg = FwCfg::new(1);
        assert!(matches!(
            cfg.add_file("", vec![]),
            Err(FwCfgError::BadName(_))
        ));
        let long = "x".repeat(FILE_NAME_MAX);
        assert!(matches!(
            cfg.add_file(&long, vec![]),
            Err(FwCfgError::BadName(_))
        ));
        assert!(matches!(
            cfg.add_file("a\0b", vec![]),
            Err(FwCfgError::BadName(_))
        ));
        cfg.add_file("etc/x", vec![]).unwrap();
        assert_eq!(
            cfg.add_file("etc/x", vec![]),
            Err(FwCfgError::Duplicate("etc/x".into()))
        );
    }
}
