#!/bin/sh
# Builds the probe guest and copies the ELF to guest/out/probe.elf.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/probe"
cargo build --release --target x86_64-unknown-none
mkdir -p "$here/out"
cp target/x86_64-unknown-none/release/probe "$here/out/probe.elf"
echo "$here/out/probe.elf"
