#!/bin/sh
# Builds the probe guest (guest/probe): the x86_64 PVH kernel into guest/out/probe.elf and the
# arm64 Image (aarch64-unknown-none, --features arm64) into guest/out/probe-arm64.img.
# Prints the path of the ELF.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/probe"
for target in x86_64-unknown-none aarch64-unknown-none; do
    if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
        rustup target add "$target" >&2
    fi
done
cargo build --release --target x86_64-unknown-none >&2
mkdir -p "$here/out"
cp target/x86_64-unknown-none/release/probe "$here/out/probe.elf"
# The arm64 Image is the ELF's loadable bytes from its first address (the Image header);
# objcopy from binutils-aarch64-linux-gnu (with gcc-aarch64-linux-gnu) or LLVM's.
cargo build --release --target aarch64-unknown-none --features arm64 --bin probe-arm64 >&2
objcopy=aarch64-linux-gnu-objcopy
command -v "$objcopy" >/dev/null || objcopy=llvm-objcopy
if command -v "$objcopy" >/dev/null; then
    "$objcopy" -O binary target/aarch64-unknown-none/release/probe-arm64 \
        "$here/out/probe-arm64.img.tmp"
    mv "$here/out/probe-arm64.img.tmp" "$here/out/probe-arm64.img"
else
    echo "build-probe.sh: no aarch64-linux-gnu-objcopy or llvm-objcopy: no probe-arm64.img" \
        "(apt-get install binutils-aarch64-linux-gnu)" >&2
fi
echo "$here/out/probe.elf"
