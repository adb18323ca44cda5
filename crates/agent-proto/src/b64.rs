//! Standard padded base64 (RFC 4648 §4) through the `base64` crate, in forms that need no
//! allocator: encoding into a [`Sink`] and decoding into a caller's buffer, validated before
//! anything is written.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::{ProtoError, Sink};

/// Base64 characters handled per step (a multiple of 4).
const STEP_CHARS: usize = 1024;
/// Bytes handled per step (a multiple of 3).
const STEP_BYTES: usize = STEP_CHARS / 4 * 3;

/// Length of the padded encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Writes the encoding of `data` to `out`.
pub fn encode_to<S: Sink + ?Sized>(data: &[u8], out: &mut S) {
    let mut buf = [0u8; STEP_CHARS];
    // Every step but the last is a multiple of 3 bytes: only the last one is padded.
    for chunk in data.chunks(STEP_BYTES) {
        let n = encoded_len(chunk.len());
        // `buf` holds the encoding of STEP_BYTES bytes, so this cannot fail.
        if let Some(dst) = buf.get_mut(..n) {
            if STANDARD.encode_slice(chunk, dst).is_ok() {
                out.push(dst);
            }
        }
    }
}

/// The exact decoded length of `s`, after checking all of it is valid padded base64.
pub fn decoded_len(s: &str) -> Result<usize, ProtoError> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(4) {
        return Err(ProtoError::BadBase64);
    }
    let mut scratch = [0u8; STEP_BYTES];
    let mut total = 0usize;
    let steps = s.len().div_ceil(STEP_CHARS);
    for (i, chunk) in s.chunks(STEP_CHARS).enumerate() {
        // Padding may only end the whole string, not a step.
        if i + 1 < steps && chunk.contains(&b'=') {
            return Err(ProtoError::BadBase64);
        }
        total += STANDARD
            .decode_slice(chunk, &mut scratch)
            .map_err(|_| ProtoError::BadBase64)?;
    }
    Ok(total)
}

/// Decodes `s` into the start of `dst` and returns the length written. `dst` is left
/// untouched unless all of `s` is valid and fits (else [`ProtoError::BadBase64`], or
/// [`ProtoError::TooLarge`] naming `what`).
pub fn decode_into(s: &str, dst: &mut [u8], what: &'static str) -> Result<usize, ProtoError> {
    let n = decoded_len(s)?;
    if n > dst.len() {
        return Err(ProtoError::TooLarge {
            what,
            max: dst.len(),
        });
    }
    let mut scratch = [0u8; STEP_BYTES];
    let mut at = 0usize;
    for chunk in s.as_bytes().chunks(STEP_CHARS) {
        let k = STANDARD
            .decode_slice(chunk, &mut scratch)
            .map_err(|_| ProtoError::BadBase64)?;
        let (Some(to), Some(from)) = (dst.get_mut(at..at + k), scratch.get(..k)) else {
            return Err(ProtoError::BadBase64);
        };
        to.copy_from_slice(from);
        at += k;
    }
    Ok(at)
}

/// The encoding of `data`.
#[cfg(feature = "alloc")]
pub fn encode(data: &[u8]) -> alloc::string::String {
    STANDARD.encode(data)
}

/// The bytes `s` encodes, or [`ProtoError::BadBase64`].
#[cfg(feature = "alloc")]
pub fn decode(s: &str) -> Result<alloc::vec::Vec<u8>, ProtoError> {
    STANDARD.decode(s).map_err(|_| ProtoError::BadBase64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed buffer sink, as the probe uses.
    struct Fixed<const N: usize> {
        buf: [u8; N],
        len: usize,
    }

    impl<const N: usize> Sink for Fixed<N> {
        fn push(&mut self, b: &[u8]) {
            self.buf[self.len..self.len + b.len()].copy_from_slice(b);
            self.len += b.len();
        }
    }

    fn encoded<const N: usize>(data: &[u8]) -> Fixed<N> {
        let mut f = Fixed {
            buf: [0; N],
            len: 0,
        };
        encode_to(data, &mut f);
        f
    }

    #[test]
    fn known_vectors() {
        for (plain, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
            (b"hello world", "aGVsbG8gd29ybGQ="),
        ] {
            let f = encoded::<64>(plain);
            assert_eq!(&f.buf[..f.len], enc.as_bytes());
            let mut out = [0u8; 16];
            assert_eq!(decode_into(enc, &mut out, "x"), Ok(plain.len()));
            assert_eq!(&out[..plain.len()], plain);
        }
    }

    #[test]
    fn long_inputs_round_trip_across_steps() {
        let data: [u8; 5000] = core::array::from_fn(|i| (i * 37 + 11).to_le_bytes()[0]);
        for n in [0, 1, 767, 768, 769, 1535, 1536, 1537, 5000] {
            let f = encoded::<8000>(&data[..n]);
            assert_eq!(f.len, encoded_len(n));
            let s = core::str::from_utf8(&f.buf[..f.len]).unwrap();
            assert_eq!(decoded_len(s), Ok(n));
            let mut out = [0u8; 5000];
            assert_eq!(decode_into(s, &mut out, "x"), Ok(n));
            assert_eq!(&out[..n], &data[..n]);
        }
    }

    #[test]
    fn garbage_is_refused_and_leaves_the_buffer_alone() {
        for bad in [
            "a",
            "aGk",
            "a===",
            "aG!=",
            "aGk=aGk",
            "=aGk",
            "Zg=",
            "Z===",
            "Zg=a",
            "====",
            "Zm9v YmFy",
            "aGk=aGk=",
        ] {
            assert_eq!(decoded_len(bad), Err(ProtoError::BadBase64), "{bad:?}");
        }
        // Padding that ends one step of a longer string is refused too.
        let mut long = [b'A'; 2048];
        long[1022] = b'=';
        long[1023] = b'=';
        let long = core::str::from_utf8(&long).unwrap();
        assert_eq!(decoded_len(long), Err(ProtoError::BadBase64));
        let mut dst = [9u8; 8];
        assert_eq!(
            decode_into("aGVsbG8gd29ybGQ=", &mut dst, "the file"),
            Err(ProtoError::TooLarge {
                what: "the file",
                max: 8
            })
        );
        assert_eq!(
            decode_into("aGVsbG8!", &mut dst, "x"),
            Err(ProtoError::BadBase64)
        );
        assert_eq!(dst, [9u8; 8]);
    }

    #[cfg(feature = "alloc")]
    #[test]
    fn owned_forms_agree() {
        let data: alloc::vec::Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let s = encode(&data);
        let mut v = alloc::vec::Vec::new();
        encode_to(&data, &mut v);
        assert_eq!(s.as_bytes(), &v[..]);
        assert_eq!(decode(&s), Ok(data));
        assert_eq!(decode("aGk=aGk"), Err(ProtoError::BadBase64));
    }
}
