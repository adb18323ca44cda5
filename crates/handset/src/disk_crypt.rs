//! Encryption at rest on the host side: a profile's disk image encrypted as it is copied in
//! from its template image, with the VMM's own cipher (`devices::virtio::block::crypt`:
//! AES-256-XTS per 512-byte sector, the sector number as the tweak, as dm-crypt's
//! `aes-xts-plain64`), so the handset writes exactly what virtio-blk reads.

use devices::virtio::block::crypt::{DiskKey, SectorCipher as VmmCipher};

use crate::disk_keys::DISK_KEY_LEN;
use crate::error::Error;

/// Bytes per sector.
pub const SECTOR: usize = 512;

/// AES-256-XTS over whole sectors (the expanded keys are zeroized on drop).
pub struct SectorCipher(VmmCipher);

impl SectorCipher {
    /// The cipher of a disk key (data key, then tweak key); one with equal halves is refused.
    pub fn new(key: &[u8; DISK_KEY_LEN]) -> Result<SectorCipher, Error> {
        let key =
            DiskKey::from_slice(key).map_err(|e| Error::Internal(format!("disk key: {e}")))?;
        Ok(SectorCipher(VmmCipher::new(&key)))
    }

    /// Encrypts `area` in place: whole sectors (callers pad the last one), the first of which
    /// is `first_sector`.
    pub fn encrypt(&self, area: &mut [u8], first_sector: u64) -> Result<(), Error> {
        self.0
            .encrypt(area, first_sector)
            .map_err(|e| Error::Internal(format!("disk encryption: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_decrypts_what_the_handset_encrypts() {
        let key: [u8; DISK_KEY_LEN] = std::array::from_fn(|i| u8::try_from(i * 13 % 251).unwrap());
        let plain: Vec<u8> = (0..4 * SECTOR)
            .map(|i| u8::try_from(i % 7).unwrap())
            .collect();
        let mut area = plain.clone();
        SectorCipher::new(&key)
            .unwrap()
            .encrypt(&mut area, 10)
            .unwrap();
        assert_ne!(area, plain);
        // Each sector under its own tweak: equal plaintext sectors differ in the file.
        assert_ne!(area[..SECTOR], area[SECTOR..2 * SECTOR]);
        use devices::virtio::block::crypt as vmm;
        let theirs = vmm::SectorCipher::new(&vmm::DiskKey::from_slice(&key).unwrap());
        theirs.decrypt(&mut area, 10).unwrap();
        assert_eq!(area, plain);
    }
}
