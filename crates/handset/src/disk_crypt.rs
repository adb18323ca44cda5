//! Encryption at rest on the host side: a profile's disk image encrypted as it is copied in
//! from its template image, in the format the VMM's virtio-blk reads
//! (`devices::virtio::block::crypt`): AES-256-XTS per 512-byte sector, the sector number
//! (little-endian, 128 bits) as the tweak, as dm-crypt's `aes-xts-plain64`.

use aes::cipher::KeyInit;
use aes::Aes256;
use xts_mode::{get_tweak_default, Xts128};

use crate::disk_keys::DISK_KEY_LEN;

/// Bytes per sector.
pub const SECTOR: usize = 512;

/// AES-256-XTS over whole sectors (the expanded keys are zeroized on drop, `aes`'s `zeroize`).
pub struct SectorCipher(Xts128<Aes256>);

impl SectorCipher {
    /// The cipher of a disk key (data key, then tweak key).
    pub fn new(key: &[u8; DISK_KEY_LEN]) -> SectorCipher {
        let (data, tweak) = key.split_at(DISK_KEY_LEN / 2);
        SectorCipher(Xts128::new(
            Aes256::new(data.into()),
            Aes256::new(tweak.into()),
        ))
    }

    /// Encrypts `area` in place: whole sectors, the first of which is `first_sector`.
    ///
    /// # Panics
    /// Never for a whole number of sectors; callers pad the last one.
    pub fn encrypt(&self, area: &mut [u8], first_sector: u64) {
        debug_assert!(area.len().is_multiple_of(SECTOR));
        self.0
            .encrypt_area(area, SECTOR, u128::from(first_sector), get_tweak_default);
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
        SectorCipher::new(&key).encrypt(&mut area, 10);
        assert_ne!(area, plain);
        // Each sector under its own tweak: equal plaintext sectors differ in the file.
        assert_ne!(area[..SECTOR], area[SECTOR..2 * SECTOR]);
        use devices::virtio::block::crypt as vmm;
        let theirs = vmm::SectorCipher::new(&vmm::DiskKey::from_slice(&key).unwrap());
        theirs.decrypt(&mut area, 10).unwrap();
        assert_eq!(area, plain);
    }
}
