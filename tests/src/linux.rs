//! The Debian Linux guest of `guest/build-linux.sh`: booting it and reading its `LINUX` lines.
//!
//! Its `/init` loads the virtio modules, prints `LINUX ...` lines (devices, disks, the checks
//! selected with `pv.*` on the kernel command line, kernel log lines worth judging as
//! `LINUX klog ...`) and powers off.

use crate::vm::Outcome;

/// The guest's `LINUX ...` lines, without what firmware or the kernel printed before them on
/// the same line.
pub fn linux_lines(out: &Outcome) -> Vec<&str> {
    out.serial()
        .filter_map(|l| l.find("LINUX ").map(|at| &l[at..]))
        .collect()
}

/// The first `LINUX <prefix>...` line's remainder (after `LINUX <prefix>`).
pub fn linux_line<'a>(out: &'a Outcome, prefix: &str) -> Option<&'a str> {
    let prefix = format!("LINUX {prefix}");
    linux_lines(out)
        .into_iter()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
}

/// The value of `key=value` in a space-separated line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Asserts the guest booted with every module loaded, bound virtio-blk and virtio-rng, read
/// two 16-byte blocks from `/dev/hwrng` that are not all zero and differ, saw the 8 MiB disk
/// `vda`, reached `LINUX done` and powered off (exit 0).
pub fn assert_selftest(out: &Outcome) {
    assert!(!out.timed_out, "{}", out.describe());
    let ready =
        linux_line(out, "ready").unwrap_or_else(|| panic!("no `LINUX ready`\n{}", out.describe()));
    assert_eq!(
        field(ready, "modules_failed"),
        Some("0"),
        "{ready}\n{}",
        out.describe()
    );
    let lines = linux_lines(out);
    for driver in ["driver=virtio_blk", "driver=virtio_rng"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("LINUX virtio") && l.contains(driver)),
            "no device bound to {driver}\n{}",
            out.describe()
        );
    }
    assert_rng_bytes(out);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("LINUX blk vda sectors=16384")),
        "{}",
        out.describe()
    );
    assert!(
        lines.iter().any(|l| l.starts_with("LINUX done")),
        "{}",
        out.describe()
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
}

/// Asserts the guest's two reads of `/dev/hwrng` (the `LINUX rng first=HEX second=HEX` line)
/// are 16 bytes each, not all zero, and differ: the bytes came from the host's entropy.
pub fn assert_rng_bytes(out: &Outcome) {
    let line = linux_line(out, "rng ")
        .unwrap_or_else(|| panic!("no `LINUX rng` line\n{}", out.describe()));
    let read = |key| {
        let hex = field(line, key).unwrap_or_default();
        assert!(
            hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "rng {key} is not 16 bytes of hex: {line}"
        );
        assert!(
            hex.bytes().any(|b| b != b'0'),
            "rng {key} is all zero: {line}"
        );
        hex
    };
    assert_ne!(
        read("first"),
        read("second"),
        "two reads of /dev/hwrng gave the same bytes: {line}"
    );
}

/// Kernel log lines known to come from outside pocketvisor, each with the reason.
const KNOWN_KERNEL_WARNINGS: &[(&str, &str)] = &[(
    "arch/x86/kernel/fpu/xstate.c",
    "XSAVE consistency problem, from the nested setup: CPUID 0xD.0 EBX reads 576 (the size \
     for KVM's initial XCR0, x87 only) after the guest enabled more, because QEMU's TCG does \
     not raise the SVM XSETBV intercept, so KVM in L1 never sees the new XCR0; QEMU-KVM in the \
     same L1 shows it too, and it is gone with --cpuid-hide xsave",
)];

/// The `WARNING:`, `BUG:` and `Oops` lines among the `LINUX klog` lines of a guest's console
/// `lines`, other than the known ones of [`KNOWN_KERNEL_WARNINGS`].
pub fn unexpected_kernel_warnings<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    lines
        .into_iter()
        .filter_map(|l| Some(&l[l.find("LINUX klog ")? + "LINUX klog ".len()..]))
        .filter(|l| ["WARNING:", "BUG:", "Oops"].iter().any(|w| l.contains(w)))
        .filter(|l| !KNOWN_KERNEL_WARNINGS.iter().any(|(k, _)| l.contains(k)))
        .collect()
}

/// Asserts the guest's kernel log (the `LINUX klog` lines) has no `WARNING:`, `BUG:` or
/// `Oops` other than the known ones of [`KNOWN_KERNEL_WARNINGS`].
pub fn assert_clean_kernel_log(out: &Outcome) {
    let bad = unexpected_kernel_warnings(linux_lines(out));
    assert!(
        bad.is_empty(),
        "the guest kernel logged {bad:?}\n{}",
        out.describe()
    );
}

/// Standard base64 (the agent protocol's `data_b64`).
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(
                    ABC[usize::try_from(n >> (18 - 6 * i) & 63).expect("6 bits")],
                ));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_is_the_standard_alphabet_with_padding() {
        // RFC 4648's test vectors.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(plain.as_bytes()), encoded);
        }
        assert_eq!(super::base64(&[0xfb, 0xff]), "+/8=");
    }
}
