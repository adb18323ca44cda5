#!/usr/bin/env bash
# Build the L1 machine of the nested-virtualization harness from Debian packages.
#
# NESTED_ARCH=amd64 (default): L1 is Debian's full-flavour kernel (linux-image-amd64: it ships
# kvm_amd and the 9p modules, which the cloud flavour lacks) with a busybox initramfs. QEMU boots
# it under TCG with an AMD CPU model that has SVM and nested paging; its /init
# (tests/nested/l1-init) loads kvm_amd, so commands run there see a hardware-style /dev/kvm.
#
# NESTED_ARCH=arm64: L1 is Debian's arm64 kernel (linux-image-arm64, KVM built in) with the
# arm64 busybox-static; QEMU boots it under TCG with EL2 (-M virt,virtualization=on), and its
# /init is tests/nested/l1-init-arm64. Needs `dpkg --add-architecture arm64 && apt-get update`
# once, so apt-get can download arm64 packages.
#
# Output ($NESTED_OUT, default guest/out/nested, or guest/out/nested-arm64): vmlinuz (for
# arm64 an uncompressed `Image`), initramfs.cpio.gz, version, and inputs (this script and the
# init as built: the harness rebuilds when they differ). For arm64 also guest-initramfs.cpio.gz:
# the initramfs of the Linux guest pocketvisor boots in L1 (tests/nested/guest-init-arm64 with
# the virtio-pci, -blk, -rng, -net, -balloon and vsock modules, and the guest agent,
# guest/agent built static for aarch64-unknown-linux-musl, as /bin/pocketvisor-agent: cargo
# builds it here unless AGENT_ARM64_BIN names a built one; without cargo the guest has none).
# The downloaded .debs stay in $NESTED_OUT/debs: later runs work offline.
# Needs: apt-get (download only), dpkg-deb, a static busybox for the host, gzip, xz, zstd.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
arch="${NESTED_ARCH:-amd64}"
busybox="${BUSYBOX:-/bin/busybox}" # runs on the build host (cpio, depmod fallback)

log() { printf 'build-l1: %s\n' "$*" >&2; }
die() { printf 'build-l1: error: %s\n' "$*" >&2; exit 1; }

case "$arch" in
  amd64)
    out="${NESTED_OUT:-$here/../../guest/out/nested}"
    init="$here/l1-init"
    # The modules L1 needs; their dependencies come from modules.dep.
    wanted=(virtio_pci 9pnet_virtio 9p kvm_amd tun veth)
    ;;
  arm64)
    out="${NESTED_OUT:-$here/../../guest/out/nested-arm64}"
    init="$here/l1-init-arm64"
    # tun: the TAP the arm64 guest's virtio-net uses inside L1.
    wanted=(virtio_pci 9pnet_virtio 9p tun)
    dpkg --print-foreign-architectures 2>/dev/null | grep -qx arm64 ||
      die "apt cannot download arm64 packages: run 'dpkg --add-architecture arm64 && apt-get update' (as root) once"
    ;;
  *) die "NESTED_ARCH must be amd64 or arm64, not $arch" ;;
esac
kernel_pkg="${NESTED_KERNEL_PKG:-linux-image-$arch}"
debs="$out/debs"

for tool in apt-get dpkg-deb gzip xz zstd file; do
  command -v "$tool" >/dev/null || die "missing tool: $tool"
done
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
  die "$busybox is not a static busybox (apt-get install busybox-static, or set BUSYBOX=)"

# ------------------------------------------------------------------- download
mkdir -p "$debs"
fetch() { # fetch PACKAGE: downloads its $arch build into $debs unless a .deb of it is there
  compgen -G "$debs/${1}_*_$arch.deb" >/dev/null && return
  log "apt-get download $1:$arch"
  (cd "$debs" && apt-get download "$1:$arch") || die "apt-get download $1:$arch failed (apt-get update?)"
}
fetch "$kernel_pkg"
meta="$(ls "$debs/${kernel_pkg}"_*_"$arch".deb | tail -n1)"
image_pkg="$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed -n 's/^ *\(linux-image-[^ ]*\).*/\1/p' | head -n1)"
[[ -n "$image_pkg" ]] || die "no linux-image dependency in $meta"
fetch "$image_pkg"
image="$(ls "$debs/${image_pkg}"_*_"$arch".deb | tail -n1)"
guest_busybox="$busybox"
if [[ "$arch" != amd64 ]]; then
  fetch busybox-static
  guest_busybox_deb="$(ls "$debs"/busybox-static_*_"$arch".deb | tail -n1)"
fi

# ------------------------------------------------------------------- extract
work="$(mktemp -d "${TMPDIR:-/tmp}/pv-build-l1.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "extracting $(basename "$image")"
dpkg-deb -x "$image" "$work/pkg"
vmlinuz="$(ls "$work"/pkg/boot/vmlinuz-* | head -n1)"
release="${vmlinuz##*/vmlinuz-}"
moddir="$work/pkg/lib/modules/$release"
if [[ -n "${guest_busybox_deb:-}" ]]; then
  dpkg-deb -x "$guest_busybox_deb" "$work/busybox"
  guest_busybox="$work/busybox/bin/busybox"
  file -L "$guest_busybox" | grep -q 'statically linked' || die "$guest_busybox_deb has no static busybox"
fi
if command -v depmod >/dev/null; then depmod -b "$work/pkg" "$release"; else "$busybox" depmod -b "$work/pkg" "$release"; fi
[[ -f "$moddir/modules.dep" ]] || die "depmod made no modules.dep for $release"

# ------------------------------------------------------------------- modules
declare -A deps_of file_of done_
while IFS= read -r line; do
  f="${line%%:*}"; n="$(basename "$f")"; n="${n%%.ko*}"; n="${n//-/_}"
  file_of[$n]="$f"; deps_of[$n]="${line#*:}"
done <"$moddir/modules.dep"
add() { # add NAME: its dependencies first, then itself
  local n="${1//-/_}" d
  [[ -n "${done_[$n]:-}" ]] && return 0
  done_[$n]=1
  for d in ${deps_of[$n]:-}; do d="$(basename "$d")"; add "${d%%.ko*}"; done
  [[ -n "${file_of[$n]:-}" ]] && order+=("$n")
  return 0
}
pack_root() { # pack_root DIR INIT MODULE...: busybox, the modules (with dependencies), /init
  local root="$1" init="$2" m n src; shift 2
  order=(); done_=()
  for m in "$@"; do
    if [[ -n "${file_of[$m]:-}" ]]; then add "$m"
    elif grep -q "/${m//_/[_-]}.ko" "$moddir/modules.builtin" 2>/dev/null; then log "$m is built in"
    else die "$release has no module $m"
    fi
  done
  log "modules for $(basename "$init"): ${order[*]}"
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,host,job,etc,lib/modules}
  cp "$guest_busybox" "$root/bin/busybox"
  : >"$root/etc/modules"
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
  install -m 755 "$init" "$root/init"
}
cpio_gz() { # cpio_gz DIR OUT
  (cd "$1" && find . -print | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -6 >"$2"
}
root="$work/root"
pack_root "$root" "$init" "${wanted[@]}"

# ------------------------------------------------------------------- output
mkdir -p "$out"
cpio_gz "$root" "$out/initramfs.cpio.gz.tmp"
if [[ "$arch" == arm64 ]]; then
  # The guest pocketvisor boots inside L1: the same kernel with its own small initramfs.
  pack_root "$work/guest" "$here/guest-init-arm64" virtio_pci virtio_blk virtio_rng virtio_net \
    virtio_balloon vmw_vsock_virtio_transport
  agent_src="$here/../../guest/agent"
  agent_bin="${AGENT_ARM64_BIN:-$agent_src/target/aarch64-unknown-linux-musl/release/pocketvisor-agent}"
  if [[ -z "${AGENT_ARM64_BIN:-}" ]] && command -v cargo >/dev/null; then
    log "agent: cargo build --release --target aarch64-unknown-linux-musl in guest/agent"
    (cd "$agent_src" && cargo build --release --target aarch64-unknown-linux-musl) ||
      die "the arm64 guest agent did not build (rustup target add aarch64-unknown-linux-musl?)"
  fi
  if [[ -x "$agent_bin" ]]; then
    file -L "$agent_bin" | grep -q 'ARM aarch64.*statically linked' ||
      die "$agent_bin is not a static aarch64 program"
    cp "$agent_bin" "$work/guest/bin/pocketvisor-agent"
    log "agent: $agent_bin"
  else
    log "agent: none ($agent_bin is not built): guest.agent=1 finds no agent"
  fi
  cpio_gz "$work/guest" "$out/guest-initramfs.cpio.gz.tmp"
  mv "$out/guest-initramfs.cpio.gz.tmp" "$out/guest-initramfs.cpio.gz"
fi
if [[ "$arch" == arm64 ]] && gzip -t "$vmlinuz" 2>/dev/null; then
  gzip -dc "$vmlinuz" >"$out/vmlinuz.tmp" # an arm64 Image must be loaded uncompressed
else
  cp "$vmlinuz" "$out/vmlinuz.tmp"
fi
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$release" >"$out/version"
# What the assets were built from: the harness rebuilds them when these files change.
cat "$here/build-l1.sh" "$init" >"$out/inputs"
[[ "$arch" == arm64 ]] && cat "$here/guest-init-arm64" >>"$out/inputs"
log "done: $out/{vmlinuz,initramfs.cpio.gz} ($release)"
