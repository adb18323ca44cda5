//! Encryption at rest of a disk image: AES-256-XTS per 512-byte sector, the sector number
//! (little-endian, 128 bits) as the tweak, as dm-crypt's `aes-xts-plain64` does. The host file
//! holds only ciphertext; the guest sees plaintext.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Block};
use zeroize::Zeroize;

use super::SECTOR_SIZE;

/// The sector size as a buffer length.
const SECTOR: usize = 512;
const _: () = assert!(SECTOR as u64 == SECTOR_SIZE);

/// Length of a disk key: two AES-256 keys (data and tweak).
pub const DISK_KEY_LEN: usize = 64;

/// Why a disk key or an area could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptError {
    /// The key is not 64 bytes.
    #[error("a disk key is {DISK_KEY_LEN} bytes, not {0}")]
    KeyLength(usize),
    /// The data and tweak halves of the key are equal (XTS needs them distinct).
    #[error("the two halves of a disk key are equal")]
    WeakKey,
    /// The area is not a whole number of sectors.
    #[error("{0} bytes is not a whole number of 512-byte sectors")]
    Partial(usize),
}

/// A per-profile disk data key, zeroized on drop and never printed.
pub struct DiskKey([u8; DISK_KEY_LEN]);

impl DiskKey {
    /// A key from its 64 bytes (data key, then tweak key); refuses equal halves.
    pub fn from_slice(bytes: &[u8]) -> Result<DiskKey, CryptError> {
        let key: [u8; DISK_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| CryptError::KeyLength(bytes.len()))?;
        let key = DiskKey(key);
        let (data, tweak) = key.0.split_at(DISK_KEY_LEN / 2);
        if data == tweak {
            return Err(CryptError::WeakKey);
        }
        Ok(key)
    }

    /// The key's bytes (for wrapping it; keep the copy short-lived).
    pub fn as_bytes(&self) -> &[u8; DISK_KEY_LEN] {
        &self.0
    }
}

impl Drop for DiskKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for DiskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskKey(..)")
    }
}

/// AES-256-XTS over whole sectors. The expanded keys are zeroized on drop (`aes`'s `zeroize`).
///
/// Each sector's 32 blocks go through AES in one `encrypt_blocks`/`decrypt_blocks` call, so the
/// AES-NI backend keeps several blocks in flight (one block at a time waits out each round's
/// latency: about 14x slower here, see bench `disk_crypt`).
pub struct SectorCipher {
    data: Aes256,
    tweak: Aes256,
}

/// AES blocks in a sector.
const BLOCKS: usize = SECTOR / 16;

impl SectorCipher {
    /// The cipher for `key`.
    pub fn new(key: &DiskKey) -> SectorCipher {
        let (data, tweak) = key.0.split_at(DISK_KEY_LEN / 2);
        // Both halves are 32 bytes by construction, as `into` needs.
        SectorCipher {
            data: Aes256::new(data.into()),
            tweak: Aes256::new(tweak.into()),
        }
    }

    /// Encrypts `area` in place; it holds whole sectors, the first of which is `first_sector`.
    pub fn encrypt(&self, area: &mut [u8], first_sector: u64) -> Result<(), CryptError> {
        self.each_sector(area, first_sector, |blocks| {
            self.data.encrypt_blocks(blocks)
        })
    }

    /// Decrypts `area` in place; it holds whole sectors, the first of which is `first_sector`.
    pub fn decrypt(&self, area: &mut [u8], first_sector: u64) -> Result<(), CryptError> {
        self.each_sector(area, first_sector, |blocks| {
            self.data.decrypt_blocks(blocks)
        })
    }

    /// XTS around `aes` for every sector of `area`: each block is XORed with its tweak before
    /// and after the block cipher; the first tweak is the tweak key's encryption of the sector
    /// number (128-bit little-endian), each next one the previous times x in GF(2^128).
    fn each_sector(
        &self,
        area: &mut [u8],
        first_sector: u64,
        aes: impl Fn(&mut [Block]),
    ) -> Result<(), CryptError> {
        check(area)?;
        let mut blocks = [Block::default(); BLOCKS];
        let mut tweaks = [0u128; BLOCKS];
        for (i, sector) in area.chunks_exact_mut(SECTOR).enumerate() {
            let mut t = GenericArray::from(u128::from(first_sector + i as u64).to_le_bytes());
            self.tweak.encrypt_block(&mut t);
            let mut tweak = u128::from_le_bytes(t.into());
            for ((block, t), bytes) in blocks
                .iter_mut()
                .zip(tweaks.iter_mut())
                .zip(sector.chunks_exact(16))
            {
                *t = tweak;
                let x = u128::from_le_bytes(bytes.try_into().expect("16-byte chunk")) ^ tweak;
                *block = x.to_le_bytes().into();
                tweak = times_x(tweak);
            }
            aes(&mut blocks);
            for ((block, t), bytes) in blocks
                .iter()
                .zip(tweaks.iter())
                .zip(sector.chunks_exact_mut(16))
            {
                let x = u128::from_le_bytes((*block).into()) ^ t;
                bytes.copy_from_slice(&x.to_le_bytes());
            }
        }
        blocks.iter_mut().for_each(|b| b.as_mut_slice().zeroize());
        Ok(())
    }
}

/// Multiplication by x in XTS's GF(2^128) (the little-endian convention of IEEE 1619).
fn times_x(t: u128) -> u128 {
    (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 }
}

/// Only whole sectors: a partial one would be left in clear or break XTS's block minimum.
fn check(area: &[u8]) -> Result<(), CryptError> {
    if (area.len() as u64).is_multiple_of(SECTOR_SIZE) {
        Ok(())
    } else {
        Err(CryptError::Partial(area.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> DiskKey {
        let bytes: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(31) ^ seed).collect();
        DiskKey::from_slice(&bytes).unwrap()
    }

    /// An answer from an independent implementation (OpenSSL's AES-256-XTS through Python's
    /// `cryptography`, tweak = sector 0x1234 little-endian) for bytes 0..=255 twice.
    #[test]
    fn matches_openssl_aes_256_xts() {
        let mut area: Vec<u8> = (0..=255u8).cycle().take(512).collect();
        SectorCipher::new(&key(9))
            .encrypt(&mut area, 0x1234)
            .unwrap();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&area[..32]),
            "5b34a381c04731aeac251dc00b3527057365db7cf51c8dbe6ccf78f49291dda8"
        );
        assert_eq!(hex(&area[496..]), "2f8a35d1a45d89dc227c2f54a88b5d9f");
    }

    #[test]
    fn round_trip_and_no_plaintext() {
        let cipher = SectorCipher::new(&key(1));
        let plain: Vec<u8> = b"MARKER-0123456789".repeat(61)[..1024].to_vec();
        let mut area = plain.clone();
        cipher.encrypt(&mut area, 7).unwrap();
        assert_ne!(area, plain);
        assert!(!area.windows(8).any(|w| w == b"MARKER-0"));
        cipher.decrypt(&mut area, 7).unwrap();
        assert_eq!(area, plain);
    }

    #[test]
    fn sector_number_is_the_tweak() {
        let cipher = SectorCipher::new(&key(2));
        // The same plaintext in two sectors encrypts differently ...
        let mut two = vec![0x5au8; 1024];
        cipher.encrypt(&mut two, 0).unwrap();
        assert_ne!(two[..512], two[512..]);
        // ... and sector 1 of a two-sector area is sector 1 encrypted alone.
        let mut one = vec![0x5au8; 512];
        cipher.encrypt(&mut one, 1).unwrap();
        assert_eq!(one[..], two[512..]);
        // Decrypting at the wrong sector number does not give the plaintext back.
        cipher.decrypt(&mut one, 2).unwrap();
        assert_ne!(one, vec![0x5au8; 512]);
    }

    #[test]
    fn wrong_key_reads_garbage() {
        let mut area = vec![0u8; 512];
        area[..6].copy_from_slice(b"MARKER");
        let plain = area.clone();
        SectorCipher::new(&key(3)).encrypt(&mut area, 0).unwrap();
        SectorCipher::new(&key(4)).decrypt(&mut area, 0).unwrap();
        assert_ne!(area, plain);
        assert!(!area.windows(6).any(|w| w == b"MARKER"));
    }

    #[test]
    fn refuses_bad_keys_and_partial_sectors() {
        assert_eq!(
            DiskKey::from_slice(&[1u8; 32]).unwrap_err(),
            CryptError::KeyLength(32)
        );
        let mut equal = [7u8; DISK_KEY_LEN];
        equal[0] = 1;
        equal[32] = 1;
        assert_eq!(
            DiskKey::from_slice(&equal).unwrap_err(),
            CryptError::WeakKey
        );
        let cipher = SectorCipher::new(&key(5));
        let mut area = vec![0u8; 513];
        assert_eq!(cipher.encrypt(&mut area, 0), Err(CryptError::Partial(513)));
        assert_eq!(cipher.decrypt(&mut area, 0), Err(CryptError::Partial(513)));
        assert_eq!(area, vec![0u8; 513]);
        assert_eq!(format!("{:?}", key(5)), "DiskKey(..)");
    }
}
