//! Locations of the binaries and guest images the tests run.

use std::path::PathBuf;

/// The workspace root: the parent of the running package's directory.
///
/// Resolved at run time first (cargo sets `CARGO_MANIFEST_DIR` for `cargo test` and
/// `cargo run`), so binaries built from another checkout that shares the target directory
/// still look at the checkout being tested; the compile-time value is the fallback.
pub fn workspace_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|p| p.join("Cargo.toml").exists())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .filter(|root| root.join("Cargo.toml").exists())
        .map(PathBuf::from)
        .unwrap_or(manifest)
}

/// The cargo target directory (`CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The `pocketvisor` binary: `$POCKETVISOR_BIN`, else the one beside the running test
/// binary (cargo puts tests in `target/<profile>/deps/` and binaries in
/// `target/<profile>/`), else `target/debug/pocketvisor`.
///
/// Panics with instructions when it has not been built: the test command (`make test`)
/// builds it before running the tests.
pub fn pocketvisor_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("POCKETVISOR_BIN") {
        return PathBuf::from(bin);
    }
    let beside_exe = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?;
        let profile_dir = if dir.ends_with("deps") {
            dir.parent()?
        } else {
            dir
        };
        Some(profile_dir.join("pocketvisor"))
    });
    if let Some(bin) = beside_exe.filter(|b| b.is_file()) {
        return bin;
    }
    let bin = target_dir().join("debug").join("pocketvisor");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`make test` does, or `cargo build -p pocketvisor`), \
         or point POCKETVISOR_BIN at it",
        bin.display()
    );
    bin
}

/// The probe guest kernel: `$POCKETVISOR_PROBE`, else `guest/out/probe.elf`.
///
/// Panics with instructions when it has not been built.
pub fn probe_elf() -> PathBuf {
    if let Some(elf) = std::env::var_os("POCKETVISOR_PROBE") {
        return PathBuf::from(elf);
    }
    let elf = workspace_root().join("guest/out/probe.elf");
    assert!(
        elf.exists(),
        "{} is missing: build it first with guest/build-probe.sh (`make test` does)",
        elf.display()
    );
    elf
}

/// The Linux guest assets built by `guest/build-linux.sh`, if they exist.
pub fn linux_assets() -> Option<(PathBuf, PathBuf)> {
    let dir = workspace_root().join("guest/out/linux");
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initramfs.cpio.gz");
    (kernel.exists() && initrd.exists()).then_some((kernel, initrd))
}
