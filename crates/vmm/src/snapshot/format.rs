//! The `state.bin` container: a header and a sequence of tagged, versioned sections.
//!
//! ```text
//! header (56 bytes):  magic "PVSNAP\0\0" | format version u32 | flags u32 (0)
//!                     | body length u64 | SHA-256 of the body [32]
//! body:               section*
//! section:            kind u32 | version u32 | length u64 | payload (JSON, `length` bytes)
//! ```
//!
//! All integers are little-endian. A reader checks the magic, the format version, the length
//! and the checksum before it looks at any section, and names the section whose kind or
//! version it does not know.

use sha2::{Digest, Sha256};

/// First eight bytes of every `state.bin`.
pub const MAGIC: [u8; 8] = *b"PVSNAP\0\0";
/// The container format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the header.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 32;
/// Largest body a reader accepts (state is small: RAM lives in `memory.bin`).
pub const MAX_BODY: u64 = 256 << 20;

/// What a section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// The VM configuration.
    Config = 1,
    /// The layout of guest RAM in `memory.bin`.
    Memory = 2,
    /// One vCPU (the architecture's vCPU state).
    Vcpu = 3,
    /// VM-wide KVM state (the architecture's: x86_64 irqchips, PIT, clock).
    VmState = 4,
    /// The serial port.
    Serial = 5,
    /// One virtio-pci function, by position (snapshots written before devices had ids;
    /// still read).
    VirtioPci = 6,
    /// The guest architecture (`"x86_64"`, `"aarch64"`); a snapshot without one is x86_64.
    Arch = 7,
    /// One virtio device and its virtio-pci function, by device id.
    Device = 8,
    /// Digests of the snapshot's other files (`memory.bin` piece by piece, `config.json`);
    /// directory snapshots only (a stream has its own checksum).
    Digests = 9,
    /// The platform devices besides the UART (the architecture's: x86_64's CMOS RTC and a
    /// firmware boot's fw_cfg position);
    /// snapshots written before it restore those devices fresh.
    Platform = 10,
}

impl SectionKind {
    /// The kind with number `n`, if known.
    pub fn from_u32(n: u32) -> Option<Self> {
        use SectionKind::*;
        [
            Config, Memory, Vcpu, VmState, Serial, VirtioPci, Arch, Device, Digests, Platform,
        ]
        .into_iter()
        .find(|k| *k as u32 == n)
    }

    /// Human name for errors.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Config => "config",
            SectionKind::Memory => "memory",
            SectionKind::Vcpu => "vcpu",
            SectionKind::VmState => "vm-state",
            SectionKind::Serial => "serial",
            SectionKind::VirtioPci => "virtio-pci",
            SectionKind::Arch => "arch",
            SectionKind::Device => "device",
            SectionKind::Digests => "digests",
            SectionKind::Platform => "platform",
        }
    }

    /// The section version this build writes and reads.
    pub fn version(self) -> u32 {
        1
    }
}

/// Why a `state.bin` cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not a pocketvisor snapshot at all.
    #[error("not a pocketvisor snapshot state file (bad magic)")]
    BadMagic,
    /// Written by another version of the format.
    #[error(
        "snapshot format version {found} is not supported (this build reads version {supported})"
    )]
    Version { found: u32, supported: u32 },
    /// Header flags this build does not know.
    #[error("snapshot state file has unknown header flags {0:#x}")]
    Flags(u32),
    /// Shorter than its header says.
    #[error("snapshot state file is truncated")]
    Truncated,
    /// Longer than its header says, or absurdly large.
    #[error("snapshot state file has a bad length")]
    BadLength,
    /// The body does not match its checksum.
    #[error("snapshot state file is corrupted (checksum mismatch)")]
    Checksum,
    /// A section of unknown kind.
    #[error("snapshot has a section of unknown kind {0} (written by a newer pocketvisor?)")]
    UnknownSection(u32),
    /// A known section in a version this build does not read.
    #[error("snapshot section {name} has version {found}; this build reads version {supported}")]
    SectionVersion {
        name: &'static str,
        found: u32,
        supported: u32,
    },
    /// A section's payload does not decode.
    #[error("snapshot section {name}: {reason}")]
    Decode { name: &'static str, reason: String },
    /// A section that must be present is missing, or one that must be unique repeats.
    #[error("snapshot section {0} is missing or repeated")]
    Missing(&'static str),
    /// A section's value does not serialise (writing).
    #[error("snapshot section {name} does not serialise: {source}")]
    Encode {
        name: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// One decoded-enough section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// What it holds.
    pub kind: SectionKind,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Section {
    /// Decodes the JSON payload.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, FormatError> {
        serde_json::from_slice(&self.payload).map_err(|e| FormatError::Decode {
            name: self.kind.name(),
            reason: e.to_string(),
        })
    }
}

/// Builds a `state.bin`.
#[derive(Default)]
pub struct Writer {
    body: Vec<u8>,
}

impl Writer {
    /// An empty container.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a section holding `value` as JSON.
    pub fn add<T: serde::Serialize>(
        &mut self,
        kind: SectionKind,
        value: &T,
    ) -> Result<(), FormatError> {
        let payload = serde_json::to_vec(value).map_err(|source| FormatError::Encode {
            name: kind.name(),
            source,
        })?;
        self.add_raw(kind as u32, kind.version(), &payload);
        Ok(())
    }

    /// Appends a section with any kind, version and payload (tests use this for bad input).
    pub fn add_raw(&mut self, kind: u32, version: u32, payload: &[u8]) {
        self.body.extend_from_slice(&kind.to_le_bytes());
        self.body.extend_from_slice(&version.to_le_bytes());
        self.body
            .extend_from_slice(&(payload.len() as u64).to_le_bytes());
        self.body.extend_from_slice(payload);
    }

    /// The whole file: header and body.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.body.len() as u64).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(&self.body));
        out.extend_from_slice(&self.body);
        out
    }
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Checks the header and checksum of a whole `state.bin` and splits it into sections.
pub fn read(file: &[u8]) -> Result<Vec<Section>, FormatError> {
    if file.len() < MAGIC.len() || file[..MAGIC.len()] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = le_u32(file, 8).ok_or(FormatError::Truncated)?;
    if version != FORMAT_VERSION {
        return Err(FormatError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let flags = le_u32(file, 12).ok_or(FormatError::Truncated)?;
    if flags != 0 {
        return Err(FormatError::Flags(flags));
    }
    let body_len = le_u64(file, 16).ok_or(FormatError::Truncated)?;
    let sum = file.get(24..HEADER_LEN).ok_or(FormatError::Truncated)?;
    if body_len > MAX_BODY {
        return Err(FormatError::BadLength);
    }
    let body = &file[HEADER_LEN..];
    match (body.len() as u64).cmp(&body_len) {
        std::cmp::Ordering::Less => return Err(FormatError::Truncated),
        std::cmp::Ordering::Greater => return Err(FormatError::BadLength),
        std::cmp::Ordering::Equal => {}
    }
    if Sha256::digest(body).as_slice() != sum {
        return Err(FormatError::Checksum);
    }
    let mut sections = Vec::new();
    let mut at = 0usize;
    while at < body.len() {
        let kind = le_u32(body, at).ok_or(FormatError::Truncated)?;
        let version = le_u32(body, at + 4).ok_or(FormatError::Truncated)?;
        let len = le_u64(body, at + 8).ok_or(FormatError::Truncated)?;
        let start = at + 16;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= body.len())
            .ok_or(FormatError::Truncated)?;
        let kind = SectionKind::from_u32(kind).ok_or(FormatError::UnknownSection(kind))?;
        if version != kind.version() {
            return Err(FormatError::SectionVersion {
                name: kind.name(),
                found: version,
                supported: kind.version(),
            });
        }
        sections.push(Section {
            kind,
            payload: body[start..end].to_vec(),
        });
        at = end;
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        w.add(SectionKind::Config, &"hello").unwrap();
        w.add(SectionKind::Vcpu, &vec![1u32, 2, 3]).unwrap();
        w.finish()
    }

    #[test]
    fn round_trip() {
        let s = read(&sample()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].kind, SectionKind::Config);
        assert_eq!(s[0].decode::<String>().unwrap(), "hello");
        assert_eq!(s[1].decode::<Vec<u32>>().unwrap(), vec![1, 2, 3]);
        assert!(matches!(
            s[1].decode::<String>(),
            Err(FormatError::Decode { name: "vcpu", .. })
        ));
    }

    #[test]
    fn every_flipped_body_or_header_byte_is_caught() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            assert!(read(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn header_errors_are_specific() {
        let good = sample();
        assert!(matches!(read(b"nope"), Err(FormatError::BadMagic)));
        let mut v2 = good.clone();
        v2[8] = 2;
        let e = read(&v2).unwrap_err();
        assert!(matches!(
            e,
            FormatError::Version {
                found: 2,
                supported: 1
            }
        ));
        assert!(e.to_string().contains("version 2"));
        assert!(matches!(
            read(&good[..good.len() - 1]),
            Err(FormatError::Truncated)
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(read(&long), Err(FormatError::BadLength)));
        assert!(matches!(read(&good[..20]), Err(FormatError::Truncated)));
    }

    #[test]
    fn unknown_kinds_and_versions_name_the_section() {
        let mut w = Writer::new();
        w.add_raw(SectionKind::Serial as u32, 7, b"{}");
        let e = read(&w.finish()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "snapshot section serial has version 7; this build reads version 1"
        );
        let mut w = Writer::new();
        w.add_raw(99, 1, b"{}");
        assert!(matches!(
            read(&w.finish()),
            Err(FormatError::UnknownSection(99))
        ));
        // A section length running past the end (with a valid checksum) is truncation.
        let mut w = Writer::new();
        w.add_raw(1, 1, b"{}");
        let mut body = w.body.clone();
        body[8] = 200;
        let mut w2 = Writer::new();
        w2.body = body;
        assert!(matches!(read(&w2.finish()), Err(FormatError::Truncated)));
    }
}
