use super::*;

#[test]
fn versions_are_read_as_rfc_6143_says() {
    assert_eq!(parse_version(b"RFB 003.008\n"), Ok(Version::V3_8));
    assert_eq!(parse_version(b"RFB 003.007\n"), Ok(Version::V3_7));
    assert_eq!(parse_version(b"RFB 003.003\n"), Ok(Version::V3_3));
    assert_eq!(parse_version(b"RFB 003.005\n"), Ok(Version::V3_3));
    assert_eq!(parse_version(b"RFB 003.889\n"), Ok(Version::V3_3));
    assert_eq!(parse_version(b"RFB 003.010\n"), Ok(Version::V3_8));
    for bad in [
        b"RFB 004.000\n",
        b"HTTP/1.1 200",
        b"RFB 003.00x\n",
        b"RFB 003.008 ",
    ] {
        assert!(parse_version(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn each_client_message_is_decoded_once_complete() {
    let key = [4, 1, 0, 0, 0, 0, 0, 0x61];
    for n in 0..key.len() {
        assert_eq!(parse_client_message(&key[..n]), Ok(None));
    }
    assert_eq!(
        parse_client_message(&key),
        Ok(Some((
            ClientMessage::Key {
                down: true,
                keysym: 0x61
            },
            8
        )))
    );
    let request = [3, 1, 0, 1, 0, 2, 0, 3, 0, 4, 0xff];
    assert_eq!(
        parse_client_message(&request),
        Ok(Some((
            ClientMessage::UpdateRequest {
                incremental: true,
                x: 1,
                y: 2,
                width: 3,
                height: 4
            },
            10
        )))
    );
    let pointer = [5, 1, 0, 10, 0, 20];
    assert_eq!(
        parse_client_message(&pointer),
        Ok(Some((
            ClientMessage::Pointer {
                buttons: 1,
                x: 10,
                y: 20
            },
            6
        )))
    );
    let encodings = [2, 0, 0, 2, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x21];
    assert_eq!(
        parse_client_message(&encodings),
        Ok(Some((
            ClientMessage::SetEncodings(vec![encoding::RAW, encoding::DESKTOP_SIZE]),
            12
        )))
    );
    assert_eq!(parse_client_message(&encodings[..11]), Ok(None));
    let cut = [6, 0, 0, 0, 0, 0, 0, 2, b'h', b'i'];
    assert_eq!(
        parse_client_message(&cut),
        Ok(Some((ClientMessage::CutText { len: 2 }, 10)))
    );
    let mut pf = vec![0, 0, 0, 0];
    pf.extend_from_slice(&PixelFormat::NATIVE.to_bytes());
    assert_eq!(
        parse_client_message(&pf),
        Ok(Some((
            ClientMessage::SetPixelFormat(PixelFormat::NATIVE),
            20
        )))
    );
}

#[test]
fn hostile_messages_end_the_session_without_buffering() {
    assert_eq!(
        parse_client_message(&[7, 0, 0, 0]),
        Err(ProtoError::UnknownMessage(7))
    );
    assert_eq!(
        parse_client_message(&[255]),
        Err(ProtoError::UnknownMessage(255))
    );
    // A 4 GiB cut text is refused from its header, before any of it is buffered.
    assert_eq!(
        parse_client_message(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        Err(ProtoError::CutTextTooLong(u32::MAX))
    );
    assert_eq!(
        parse_client_message(&[2, 0, 0xff, 0xff]),
        Err(ProtoError::TooManyEncodings(0xffff))
    );
    let mut colour_map = PixelFormat::NATIVE.to_bytes();
    colour_map[3] = 0;
    assert!(PixelFormat::from_bytes(&colour_map).is_err());
    let mut wide = PixelFormat::NATIVE.to_bytes();
    wide[10] = 30; // red shifted out of a 32-bit pixel
    assert!(PixelFormat::from_bytes(&wide).is_err());
    let mut odd = PixelFormat::NATIVE.to_bytes();
    odd[0] = 24;
    assert!(PixelFormat::from_bytes(&odd).is_err());
}

#[test]
fn pixels_are_encoded_in_the_clients_format() {
    let rgb = [0x12, 0x34, 0x56];
    let mut out = Vec::new();
    PixelFormat::NATIVE.encode(&rgb, &mut out);
    assert_eq!(out, [0x56, 0x34, 0x12, 0]);
    let bgr_be = PixelFormat {
        big_endian: true,
        red_shift: 0,
        blue_shift: 16,
        ..PixelFormat::NATIVE
    };
    out.clear();
    bgr_be.encode(&rgb, &mut out);
    assert_eq!(out, [0, 0x56, 0x34, 0x12]);
    let rgb565 = PixelFormat {
        bits_per_pixel: 16,
        depth: 16,
        big_endian: false,
        red_max: 31,
        green_max: 63,
        blue_max: 31,
        red_shift: 11,
        green_shift: 5,
        blue_shift: 0,
    };
    out.clear();
    rgb565.encode(&[255, 255, 255, 255, 0, 0], &mut out);
    assert_eq!(out, [0xff, 0xff, 0x00, 0xf8]);
    let bgr233 = PixelFormat {
        bits_per_pixel: 8,
        depth: 8,
        big_endian: false,
        red_max: 7,
        green_max: 7,
        blue_max: 3,
        red_shift: 0,
        green_shift: 3,
        blue_shift: 6,
    };
    out.clear();
    bgr233.encode(&[255, 0, 0, 0, 0, 255], &mut out);
    assert_eq!(out, [0x07, 0xc0]);
}

#[test]
fn server_init_carries_size_format_and_name() {
    let mut out = Vec::new();
    server_init(180, 320, "work", &mut out);
    assert_eq!(&out[..4], &[0, 180, 1, 64]);
    assert_eq!(&out[4..20], &PixelFormat::NATIVE.to_bytes());
    assert_eq!(&out[20..24], &[0, 0, 0, 4]);
    assert_eq!(&out[24..], b"work");
}
