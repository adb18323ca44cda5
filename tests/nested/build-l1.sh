#!/usr/bin/env bash
# Build the L1 machine of the nested-virtualization harness from Debian packages.
#
# L1 is Debian's full-flavour kernel (linux-image-amd64: it ships kvm_amd and the 9p modules,
# which the cloud flavour lacks) with a busybox initramfs. QEMU boots it under TCG with an AMD
# CPU model that has SVM and nested paging; its /init (tests/nested/l1-init) loads kvm_amd, so
# commands run there see a hardware-style /dev/kvm.
#
# Output ($NESTED_OUT, default guest/out/nested): vmlinuz, initramfs.cpio.gz, version, and
# inputs (this script and l1-init as built: the harness rebuilds when they differ).
# The downloaded .debs stay in $NESTED_OUT/debs: later runs work offline.
# Needs: apt-get (download only), dpkg-deb, a static busybox, gzip, xz, zstd.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${NESTED_OUT:-$here/../../guest/out/nested}"
debs="$out/debs"
kernel_pkg="${NESTED_KERNEL_PKG:-linux-image-amd64}"
busybox="${BUSYBOX:-/bin/busybox}"

log() { printf 'build-l1: %s\n' "$*" >&2; }
die() { printf 'build-l1: error: %s\n' "$*" >&2; exit 1; }

for tool in apt-get dpkg-deb gzip xz zstd file; do
  command -v "$tool" >/dev/null || die "missing tool: $tool"
done
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
  die "$busybox is not a static busybox (apt-get install busybox-static, or set BUSYBOX=)"

# The modules L1 needs; their dependencies come from modules.dep.
wanted=(virtio_pci 9pnet_virtio 9p kvm_amd tun veth)

# ------------------------------------------------------------------- download
mkdir -p "$debs"
fetch() { # fetch PACKAGE: downloads it into $debs unless a .deb of it is there
  compgen -G "$debs/${1}_*.deb" >/dev/null && return
  log "apt-get download $1"
  (cd "$debs" && apt-get download "$1") || die "apt-get download $1 failed (apt-get update?)"
}
fetch "$kernel_pkg"
meta="$(ls "$debs/${kernel_pkg}"_*.deb | tail -n1)"
image_pkg="$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed -n 's/^ *\(linux-image-[^ ]*\).*/\1/p' | head -n1)"
[[ -n "$image_pkg" ]] || die "no linux-image dependency in $meta"
fetch "$image_pkg"
image="$(ls "$debs/${image_pkg}"_*.deb | tail -n1)"

# ------------------------------------------------------------------- extract
work="$(mktemp -d "${TMPDIR:-/tmp}/pv-build-l1.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "extracting $(basename "$image")"
dpkg-deb -x "$image" "$work/pkg"
vmlinuz="$(ls "$work"/pkg/boot/vmlinuz-* | head -n1)"
release="${vmlinuz##*/vmlinuz-}"
moddir="$work/pkg/lib/modules/$release"
if command -v depmod >/dev/null; then depmod -b "$work/pkg" "$release"; else "$busybox" depmod -b "$work/pkg" "$release"; fi
[[ -f "$moddir/modules.dep" ]] || die "depmod made no modules.dep for $release"

# ------------------------------------------------------------------- modules
declare -A deps_of file_of done_
while IFS= read -r line; do
  f="${line%%:*}"; n="$(basename "$f")"; n="${n%%.ko*}"; n="${n//-/_}"
  file_of[$n]="$f"; deps_of[$n]="${line#*:}"
done <"$moddir/modules.dep"
order=()
add() { # add NAME: its dependencies first, then itself
  local n="${1//-/_}" d
  [[ -n "${done_[$n]:-}" ]] && return 0
  done_[$n]=1
  for d in ${deps_of[$n]:-}; do d="$(basename "$d")"; add "${d%%.ko*}"; done
  [[ -n "${file_of[$n]:-}" ]] && order+=("$n")
  return 0
}
for m in "${wanted[@]}"; do
  if [[ -n "${file_of[$m]:-}" ]]; then add "$m"
  elif grep -q "/${m//_/[_-]}.ko" "$moddir/modules.builtin" 2>/dev/null; then log "$m is built in"
  else die "$release has no module $m"
  fi
done
log "modules: ${order[*]}"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,host,job,etc,lib/modules}
cp "$busybox" "$root/bin/busybox"
for n in "${order[@]}"; do
  src="$moddir/${file_of[$n]}"
  case "$src" in
    *.ko.xz) xz -dc "$src" ;;
    *.ko.zst) zstd -dcq "$src" ;;
    *.ko.gz) gzip -dc "$src" ;;
    *.ko) cat "$src" ;;
  esac >"$root/lib/modules/$n.ko"
  echo "$n" >>"$root/etc/modules"
done
install -m 755 "$here/l1-init" "$root/init"

# ------------------------------------------------------------------- output
mkdir -p "$out"
(cd "$root" && find . -print | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) |
  gzip -6 >"$out/initramfs.cpio.gz.tmp"
cp "$vmlinuz" "$out/vmlinuz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$release" >"$out/version"
# What the assets were built from: the harness rebuilds them when these files change.
cat "$here/build-l1.sh" "$here/l1-init" >"$out/inputs"
log "done: $out/{vmlinuz,initramfs.cpio.gz} ($release)"
