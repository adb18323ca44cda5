//! A 128-byte EDID 1.4 block describing one display mode, for `GET_EDID`: the driver learns the
//! panel's preferred (portrait) mode from its first detailed timing descriptor.

/// Size of the `edid` array in `virtio_gpu_resp_edid`.
pub const EDID_AREA: usize = 1024;

/// An EDID base block whose preferred mode is `width` x `height` at 60 Hz (width and height
/// are at most 4095, the most a detailed timing descriptor holds).
pub fn edid_block(width: u16, height: u16) -> [u8; 128] {
    let mut e = [0u8; 128];
    e[..8].copy_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    // Manufacturer "PVM" (5-bit letters, big endian), product 1, serial 1.
    let id =
        ((u16::from(b'P' - b'@')) << 10) | ((u16::from(b'V' - b'@')) << 5) | u16::from(b'M' - b'@');
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10..12].copy_from_slice(&1u16.to_le_bytes());
    e[12..16].copy_from_slice(&1u32.to_le_bytes());
    e[16] = 1; // week
    e[17] = 36; // 2026
    e[18] = 1;
    e[19] = 4; // EDID 1.4
    e[20] = 0xa5; // digital, 8 bits per colour, DisplayPort
    e[21] = 7; // 7 x 12 cm, a phone
    e[22] = 12;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // RGB 4:4:4, preferred timing is native
                  // sRGB chromaticity.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // No established or standard timings.
    for st in e[38..54].chunks_exact_mut(2) {
        st.copy_from_slice(&[1, 1]);
    }
    e[54..72].copy_from_slice(&detailed_timing(width, height));
    // Monitor name descriptor.
    let mut name = [0u8; 18];
    name[3] = 0xfc;
    name[5..18].copy_from_slice(b"pocketvisor\n ");
    e[72..90].copy_from_slice(&name);
    // Two dummy descriptors.
    e[93] = 0x10;
    e[111] = 0x10;
    let sum = e[..127].iter().fold(0u8, |a, &b| a.wrapping_add(b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

/// A detailed timing descriptor for `width` x `height` at about 60 Hz with small blanking.
fn detailed_timing(width: u16, height: u16) -> [u8; 18] {
    let (w, h) = (width.min(4095), height.min(4095));
    let (hblank, vblank) = (160u16, 30u16);
    let (hsync_off, hsync_w, vsync_off, vsync_w) = (48u16, 32u16, 3u16, 5u16);
    let total = (u64::from(w) + u64::from(hblank)) * (u64::from(h) + u64::from(vblank));
    let clock_10khz = u16::try_from(total * 60 / 10_000).unwrap_or(u16::MAX);
    let lo = |v: u16| v.to_le_bytes()[0];
    let hi = |v: u16| v.to_le_bytes()[1] & 0x0f;
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&clock_10khz.to_le_bytes());
    d[2] = lo(w);
    d[3] = lo(hblank);
    d[4] = (hi(w) << 4) | hi(hblank);
    d[5] = lo(h);
    d[6] = lo(vblank);
    d[7] = (hi(h) << 4) | hi(vblank);
    d[8] = lo(hsync_off);
    d[9] = lo(hsync_w);
    d[10] = ((lo(vsync_off) & 0x0f) << 4) | (lo(vsync_w) & 0x0f);
    d[11] = 0;
    d[12] = 70; // image size in mm
    d[13] = 120;
    d[14] = 0;
    d[17] = 0x1e; // digital separate sync, both positive
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_is_valid_and_names_the_mode() {
        let e = edid_block(720, 1280);
        assert_eq!(&e[..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(e.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0, "checksum");
        let d = &e[54..72];
        let hactive = u16::from(d[2]) | (u16::from(d[4] >> 4) << 8);
        let vactive = u16::from(d[5]) | (u16::from(d[7] >> 4) << 8);
        assert_eq!((hactive, vactive), (720, 1280));
        assert_ne!(u16::from_le_bytes([d[0], d[1]]), 0, "a pixel clock");
    }
}
