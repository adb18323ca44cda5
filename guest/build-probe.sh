#!/bin/sh
# Builds the probe guest (guest/probe, a no_std x86_64 PVH kernel) and copies the ELF to
# guest/out/probe.elf. Prints the path of the ELF.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/probe"
if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none; then
    rustup target add x86_64-unknown-none >&2
fi
cargo build --release --target x86_64-unknown-none >&2
mkdir -p "$here/out"
cp target/x86_64-unknown-none/release/probe "$here/out/probe.elf"
echo "$here/out/probe.elf"
