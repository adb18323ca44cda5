#!/usr/bin/env bash
# Debian's arm64 QEMU for the arm64 L1 (tests/tests/nested_arm64.rs,
# qemu_and_pocketvisor_boot_the_same_arm64_guest_in_one_l1): the comparison with QEMU's own
# `-accel kvm` inside the emulated L1. debootstrap's first stage fetches bookworm's arm64
# minbase with qemu-system-arm and its libraries (about 150 packages, 250 MB) and every package
# is unpacked into guest/out/nested-arm64/qemu-root, which L1 chroots into. Nothing is
# configured or run on the host. Cached: a second run with the binary in place does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
out="$here/guest/out/nested-arm64/qemu-root"
[[ -x "$out/usr/bin/qemu-system-aarch64" ]] && { echo "$out"; exit 0; }
die() { echo "build-qemu-arm64-root: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "missing tool: debootstrap (apt-get install debootstrap)"
mirror="${MIRROR:-}"
if [[ -z "$mirror" ]]; then
    mirror=$(grep -rhoE 'https?://deb\.debian\.org/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -n1 || true)
fi
mirror="${mirror:-http://deb.debian.org/debian}"
tmp="$out.tmp"
rm -rf "$tmp"
timeout "${TIMEOUT:-1200}" debootstrap --foreign --arch=arm64 --variant=minbase \
    --include=qemu-system-arm bookworm "$tmp" "$mirror" >&2 || die "debootstrap failed"
for deb in "$tmp"/var/cache/apt/archives/*.deb; do
    dpkg -x "$deb" "$tmp"
done
rm -rf "$tmp"/var/cache/apt/archives/*.deb
mkdir -p "$tmp/assets" "$tmp/proc" "$tmp/dev" "$tmp/tmp"
[[ -x "$tmp/usr/bin/qemu-system-aarch64" ]] || die "no qemu-system-aarch64 after unpacking"
rm -rf "$out"
mv "$tmp" "$out"
echo "$out"
