#!/usr/bin/env bash
# Install what building and testing pocketvisor needs, once: Debian packages and rustup targets.
# `make demo`, `make test` and `.ci/run` call it; it installs only what is missing, so a second
# run takes a fraction of a second and needs no network.
#
#   scripts/deps.sh          the packages every build and test needs
#   scripts/deps.sh --all    also the arm64 cross toolchain and L1, and the disk-image tools
#
# Needs root for apt-get (or prints the command to run); rustup for the targets.
set -euo pipefail

log() { printf 'deps: %s\n' "$*" >&2; }

# qemu-system-x86: the probe-under-QEMU tests, the Linux-assets tests and the nested harness's L1;
# busybox-static, lz4, xz-utils, zstd, file: guest/build-linux.sh and tests/nested/build-l1.sh;
# iproute2: network namespaces; gcc, libc6-dev, make: linking and this Makefile;
# python3-venv: make test-api-fuzz (schemathesis from PyPI); strace: the jail test;
# vncsnapshot: a VNC client no one here wrote; chromium: the browser phone's test; qemu-utils:
# qemu-img for the LUKS image of bench disk_crypt; postgresql: the MDM's fleet store, whose tests
# and bench start a throwaway cluster with its initdb and pg_ctl (/usr/lib/postgresql/*/bin).
packages=(qemu-system-x86 busybox-static iproute2 lz4 xz-utils zstd file gcc libc6-dev make
  ca-certificates python3 python3-venv strace vncsnapshot chromium qemu-utils postgresql)
# Node.js with npm drives chromium (playwright-core from npm). A Node.js that ships its own npm
# (NodeSource's) conflicts with Debian's npm package: take Debian's pair only where npm is missing.
command -v npm >/dev/null || packages+=(nodejs npm)

all=false
[ "${1:-}" = "--all" ] && all=true
if $all; then
  # The arm64 port: the cross C compiler for zstd and bundled SQLite, its headers, objcopy for the
  # probe's Image, qemu-system-aarch64 for the arm64 L1.
  packages+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu qemu-system-arm)
  # guest/build-disk-image.sh and the firmware it boots.
  packages+=(seabios ovmf debootstrap e2fsprogs fdisk grub-pc-bin grub-efi-amd64-bin mtools
    dosfstools)
fi

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
# tests/nested/build-l1.sh downloads arm64 kernel and busybox packages with apt-get.
need_arm64_arch=false
if $all && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  need_arm64_arch=true
fi

if [ ${#missing[@]} -gt 0 ] || $need_arm64_arch; then
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: ${missing[*]}"
    log "run as root: apt-get install -y --no-install-recommends ${missing[*]}"
    exit 1
  fi
  $need_arm64_arch && { log "adding the arm64 architecture to dpkg"; dpkg --add-architecture arm64; }
  log "installing ${missing[*]:-nothing} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  [ ${#missing[@]} -eq 0 ] || apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

targets=(x86_64-unknown-none aarch64-unknown-none)
$all && targets+=(aarch64-unknown-linux-musl)
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" || { log "rustup target add $t"; rustup target add "$t"; }
done
components=$(rustup component list --installed)
for c in rustfmt clippy; do
  grep -q "^$c" <<<"$components" || { log "rustup component add $c"; rustup component add "$c"; }
done
