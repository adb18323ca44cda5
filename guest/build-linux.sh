#!/usr/bin/env bash
# Build the Linux guest assets for pocketvisor from Debian packages.
#
# Output (guest/out/linux/):
#   vmlinux          the uncompressed ELF kernel (booted through its PVH entry note)
#   bzImage          the same kernel as Debian ships it (Linux 64-bit boot protocol)
#   initramfs.cpio.gz busybox-static + virtio modules + /init
#   version          the kernel release string
#
# Needs: apt-get (only network access), dpkg-deb, busybox-static, file, gzip, xz-utils, zstd,
# lz4 (Debian's kernel payload is LZ4).
# Re-runs reuse the downloaded .debs in guest/out/linux/debs, so after the first run
# it works fully offline.
#
# Environment:
#   KERNEL_PKG   the meta package to resolve (default linux-image-cloud-amd64)
#   BUSYBOX      path to a static busybox (default: /bin/busybox from busybox-static)
#   AGENT_BIN    a built guest agent to include (default: guest/agent, built static here)
#   OUT_DIR      where to build (default guest/out/linux)
#   EXTRA_MODULES  more modules for the initramfs, space-separated (the display guest:
#                KERNEL_PKG=linux-image-amd64 EXTRA_MODULES=virtio_gpu; the cloud kernel has no DRM)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT_DIR:-$here/out/linux}"
debs="$out/debs"
work="$out/work"
kernel_pkg="${KERNEL_PKG:-linux-image-cloud-amd64}"

log() { printf 'build-linux: %s\n' "$*" >&2; }
die() { printf 'build-linux: error: %s\n' "$*" >&2; exit 1; }

# Modules the guest needs; their dependencies are added from modules.dep.
wanted_modules=(
  virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev
  virtio_blk virtio_net net_failover failover
  vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
  virtio_rng virtio_console virtio_input virtio_balloon
)
# shellcheck disable=SC2206 # a space-separated list by design
wanted_modules+=(${EXTRA_MODULES:-})

find_busybox() {
  if [[ -n "${BUSYBOX:-}" ]]; then echo "$BUSYBOX"; return; fi
  for c in /bin/busybox /usr/bin/busybox; do
    if [[ -x "$c" ]] && file -L "$c" | grep -q 'statically linked'; then echo "$c"; return; fi
  done
  die "no static busybox found: apt-get install busybox-static (or set BUSYBOX=)"
}

for tool in dpkg-deb gzip xz zstd file; do
  command -v "$tool" >/dev/null || die "missing tool: $tool"
done
busybox="$(find_busybox)"

# ---------------------------------------------------------------- download
mkdir -p "$debs"
download() {
  local pkg="$1"
  if compgen -G "$debs/${pkg}_*.deb" >/dev/null; then
    log "using cached $(basename "$(ls "$debs/${pkg}"_*.deb | tail -n1)")"
    return
  fi
  log "apt-get download $pkg"
  (cd "$debs" && apt-get download "$pkg") || die "apt-get download $pkg failed (run apt-get update?)"
}

# The meta package depends on the versioned image package; resolve it from the cached
# meta .deb when present (offline), else from apt's candidate.
download "$kernel_pkg"
meta_deb="$(ls "$debs/${kernel_pkg}"_*.deb | tail -n1)"
image_pkg="$(dpkg-deb -f "$meta_deb" Depends | tr ',' '\n' | sed -n 's/^ *\(linux-image-[^ ]*\).*/\1/p' | head -n1)"
[[ -n "$image_pkg" ]] || die "cannot find the linux-image dependency of $kernel_pkg"
download "$image_pkg"
image_deb="$(ls "$debs/${image_pkg}"_*.deb | tail -n1)"

# ---------------------------------------------------------------- extract
rm -rf "$work"
mkdir -p "$work/pkg"
log "extracting $(basename "$image_deb")"
dpkg-deb -x "$image_deb" "$work/pkg"
bz="$(ls "$work"/pkg/boot/vmlinuz-* | head -n1)"
[[ -f "$bz" ]] || die "no /boot/vmlinuz-* in $image_deb"
release="${bz##*/vmlinuz-}"
moddir="$work/pkg/lib/modules/$release"
# The .deb does not ship modules.dep (depmod makes it at install time): make it here.
if [[ ! -f "$moddir/modules.dep" ]]; then
  if command -v depmod >/dev/null; then
    depmod -b "$work/pkg" "$release"
  else
    "$busybox" depmod -b "$work/pkg" "$release"
  fi
fi
[[ -f "$moddir/modules.dep" ]] || die "depmod made no modules.dep for $release"
cp "$bz" "$out/bzImage"
echo "$release" >"$out/version"

# ---------------------------------------------------------------- vmlinux
# The bzImage header (boot protocol >= 2.08) says where the compressed payload is:
# setup_sects at 0x1F1 (0 means 4), payload_offset at 0x248 and payload_length at 0x24C,
# both relative to the protected-mode code that follows the (setup_sects + 1) * 512 byte setup.
le32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
[[ "$(dd if="$bz" bs=1 skip=514 count=4 status=none)" == "HdrS" ]] || die "$bz is not a bzImage"
setup_sects="$(u8 "$bz" $((0x1F1)))"
if [[ "$setup_sects" -eq 0 ]]; then setup_sects=4; fi
pm_start=$(((setup_sects + 1) * 512))
payload_off=$((pm_start + $(le32 "$bz" $((0x248)))))
payload_len="$(le32 "$bz" $((0x24C)))"
payload="$work/payload"
dd if="$bz" of="$payload" bs=1M iflag=skip_bytes,count_bytes skip="$payload_off" count="$payload_len" status=none
magic="$(od -An -tx1 -N6 "$payload" | tr -d ' \n')"
log "payload at $payload_off, $payload_len bytes, magic $magic"
case "$magic" in
  1f8b*) decomp=(gzip -dc) ;;
  fd377a585a00*) decomp=(xz -dc) ;;
  28b52ffd*) decomp=(zstd -dcq) ;;
  5d0000*) decomp=(xz -dc --format=lzma) ;;
  02214c18*) decomp=(lz4 -dc) ;;
  425a68*) decomp=(bzip2 -dc) ;;
  *) die "unknown kernel compression (magic $magic)" ;;
esac
command -v "${decomp[0]}" >/dev/null || die "missing tool ${decomp[0]} (apt-get install ${decomp[0]})"
# The payload may carry padding after the stream; keep what decompressed.
"${decomp[@]}" <"$payload" >"$out/vmlinux" 2>"$work/decomp.err" || true
[[ "$(head -c 4 "$out/vmlinux" | od -An -tx1 | tr -d ' ')" == "7f454c46" ]] ||
  die "decompressed kernel is not an ELF: $(cat "$work/decomp.err")"
log "vmlinux: $(file -b "$out/vmlinux" | cut -c1-60)"

# ---------------------------------------------------------------- modules
# modules.dep lines: "kernel/path/a.ko: kernel/path/b.ko kernel/path/c.ko".
declare -A dep_of path_of
while IFS= read -r line; do
  mod="${line%%:*}"
  name="$(basename "$mod")"
  name="${name%%.ko*}"
  name="${name//-/_}"
  path_of[$name]="$mod"
  dep_of[$name]="${line#*:}"
done <"$moddir/modules.dep"

declare -A builtin
if [[ -f "$moddir/modules.builtin" ]]; then
  while IFS= read -r line; do
    name="$(basename "$line")"
    name="${name%%.ko*}"
    builtin[${name//-/_}]=1
  done <"$moddir/modules.builtin"
fi

declare -A visited
order=()
visit() {
  local name="${1//-/_}" dep dname
  [[ -n "${visited[$name]:-}" ]] && return
  visited[$name]=1
  for dep in ${dep_of[$name]}; do
    dname="$(basename "$dep")"
    visit "${dname%%.ko*}"
  done
  order+=("$name")
}
for m in "${wanted_modules[@]}"; do
  m="${m//-/_}"
  if [[ -n "${path_of[$m]:-}" ]]; then
    visit "$m"
  elif [[ -n "${builtin[$m]:-}" ]]; then
    log "module $m is built into the kernel"
  else
    log "warning: module $m not found in $release"
  fi
done
for must in virtio_pci virtio_blk; do
  [[ -n "${path_of[$must]:-}" || -n "${builtin[$must]:-}" ]] || die "kernel has no $must"
done

# ---------------------------------------------------------------- initramfs
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,lib/modules}
cp "$busybox" "$root/bin/busybox"
: >"$root/etc/modules-order"
for name in "${order[@]}"; do
  src="$moddir/${path_of[$name]}"
  dst="$root/lib/modules/$name.ko"
  case "$src" in
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -dcq "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *.ko) cp "$src" "$dst" ;;
    *) die "unexpected module file $src" ;;
  esac
  echo "$name" >>"$root/etc/modules-order"
done
log "modules (load order): ${order[*]}"
# The channel agent (guest/agent), built static here unless AGENT_BIN names one (or there
# is no cargo): started by /init with pv.agent=1.
agent_bin="${AGENT_BIN:-$here/agent/target/x86_64-unknown-linux-gnu/release/pocketvisor-agent}"
if [[ -z "${AGENT_BIN:-}" ]] && command -v cargo >/dev/null; then
  log "agent: cargo build --release (static) in guest/agent"
  (cd "$here/agent" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --target x86_64-unknown-linux-gnu) || die "the agent did not build"
fi
if [[ -x "$agent_bin" ]]; then
  cp "$agent_bin" "$root/bin/pocketvisor-agent"
  log "agent: $agent_bin"
else
  log "agent: none ($agent_bin is not built): pv.agent=1 does nothing"
fi

cat >"$root/init" <<'INIT'
#!/bin/busybox sh
# pocketvisor Linux guest init: load the virtio modules, report, power off.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
failed=0
for m in $(cat /etc/modules-order); do
  if ! insmod "/lib/modules/$m.ko" 2>/tmp/insmod.err; then
    # "File exists" means it is already loaded; anything else is a failure.
    grep -q 'exists' /tmp/insmod.err || { echo "LINUX insmod $m failed: $(cat /tmp/insmod.err)"; failed=$((failed + 1)); }
  fi
done
echo "LINUX ready kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) modules_failed=$failed"
sleep 1
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d" ] || continue
  echo "LINUX virtio $(basename "$d") device=$(cat "$d/device") driver=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)"
done
for b in /sys/block/vd*; do
  [ -e "$b" ] || continue
  echo "LINUX blk $(basename "$b") sectors=$(cat "$b/size") ro=$(cat "$b/ro")"
done
if [ -e /dev/hwrng ]; then
  # Two reads of the device (virtio-rng): the tests check they are not all zero and differ.
  echo "LINUX rng first=$(head -c 16 /dev/hwrng | hexdump -v -e '16/1 "%02x"')" \
    "second=$(head -c 16 /dev/hwrng | hexdump -v -e '16/1 "%02x"')"
fi
for n in /sys/class/net/*; do
  [ "$(basename "$n")" = lo ] && continue
  [ -e "$n" ] && echo "LINUX net $(basename "$n") mac=$(cat "$n/address")"
done
if [ -x /bin/pocketvisor-agent ] && grep -q 'pv.agent=1' /proc/cmdline; then
  echo "LINUX agent starting"
  /bin/pocketvisor-agent &
  agent=$!
  # The host ends the session by putting a file named pv-poweroff into the agent's inbox; the
  # guest then goes on to judge its kernel log and power off.
  # pv.heartbeat=N: a line with the uptime every N seconds while the agent serves (the
  # handset's suspend/resume check sees the guest go on where it was).
  beat="$(tr ' ' '\n' </proc/cmdline | sed -n 's/^pv.heartbeat=//p' | tail -n1)"
  i=0
  while kill -0 "$agent" 2>/dev/null && [ ! -e /var/lib/pocketvisor-agent/inbox/pv-poweroff ]; do
    sleep 1
    i=$((i + 1))
    [ -n "$beat" ] && [ $((i % beat)) -eq 0 ] && echo "LINUX heartbeat uptime=$(cut -d' ' -f1 /proc/uptime)"
  done
  kill "$agent" 2>/dev/null
  wait "$agent"
  echo "LINUX agent exited status=$?"
fi
# Checks the tests select on the kernel command line (each prints LINUX lines the host parses).
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }
if [ "$(arg pv.cpuflags)" = 1 ]; then
  echo "LINUX cpuflags $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)"
fi
# pv.blk.rw=vdX: hash block 0 (written by the host), write 64 KiB of a known pattern at
# block 256 with an fsync (a flush request), drop the page cache and hash it back.
d="$(arg pv.blk.rw)"
if [ -n "$d" ] && [ -b "/dev/$d" ]; then
  echo "LINUX blkread $d sha256=$(dd if="/dev/$d" bs=4096 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
  if yes pocketvisor-blk | head -c 65536 | dd of="/dev/$d" bs=4096 seek=256 conv=fsync 2>/tmp/dd.err; then
    echo "LINUX blkwrite $d status=ok cache=$(cat "/sys/block/$d/queue/write_cache" | tr ' ' _)"
  else
    echo "LINUX blkwrite $d status=failed $(tail -n1 /tmp/dd.err)"
  fi
  sync; echo 3 >/proc/sys/vm/drop_caches
  echo "LINUX blkreread $d sha256=$(dd if="/dev/$d" bs=4096 skip=256 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
fi
# pv.blk.ro=vdX: a write to a read-only disk must be refused.
d="$(arg pv.blk.ro)"
if [ -n "$d" ] && [ -b "/dev/$d" ]; then
  if dd if=/dev/zero of="/dev/$d" bs=4096 count=1 conv=fsync 2>/dev/null; then w=accepted; else w=refused; fi
  echo "LINUX blkro $d write=$w ro=$(cat "/sys/block/$d/ro")"
fi
# pv.net=ADDR/PREFIX,PEER,PORT: configure eth0, ping PEER, send 1 MiB over TCP to PEER:PORT.
n="$(arg pv.net)"
if [ -n "$n" ]; then
  addr="${n%%,*}"; rest="${n#*,}"; peer="${rest%%,*}"; port="${rest#*,}"
  ip link set lo up; ip link set eth0 up; ip addr add "$addr" dev eth0
  if ping -c 3 -w 20 "$peer" >/tmp/ping.out 2>&1; then s=ok; else s=failed; fi
  echo "LINUX ping $peer status=$s $(grep -o '[0-9]* packets received' /tmp/ping.out | tr ' ' _)"
  head -c 1048576 /dev/urandom >/tmp/tx
  if nc "$peer" "$port" </tmp/tx; then s=ok; else s=failed; fi
  echo "LINUX tcp sent=$(wc -c </tmp/tx) sha256=$(sha256sum </tmp/tx | cut -d' ' -f1) status=$s"
fi
if [ "$(arg pv.clock)" = 1 ]; then
  echo "LINUX clock epoch=$(date +%s) rtc=$(cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null || echo none) clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
fi
# pv.memtouch=MB: fill MB of guest RAM (a tmpfs file), then free it (balloon tests).
m="$(arg pv.memtouch)"
if [ -n "$m" ]; then
  mkdir -p /mnt/touch && mount -t tmpfs -o size=$((m + 16))m tmpfs /mnt/touch
  yes pocketvisor-balloon | head -c $((m * 1048576)) >/mnt/touch/fill
  echo "LINUX memtouch mb=$m file_kb=$(du -k /mnt/touch/fill | cut -f1)"
  rm /mnt/touch/fill && umount /mnt/touch
  echo "LINUX memfreed mb=$m"
fi
# pv.balloon=1: wait (at most 600 s) until the balloon has been inflated and deflated all the
# way (/proc/vmstat's balloon_inflate and balloon_deflate page counters), then go on to power off.
if [ "$(arg pv.balloon)" = 1 ]; then
  i=0
  while [ "$i" -lt 600 ]; do
    inf="$(awk '/^balloon_inflate /{print $2}' /proc/vmstat)"
    def="$(awk '/^balloon_deflate /{print $2}' /proc/vmstat)"
    [ -n "$inf" ] || break # a kernel without CONFIG_MEMORY_BALLOON's counters
    [ "${inf:-0}" -gt 0 ] && [ "$inf" = "$def" ] && break
    i=$((i + 1))
    sleep 1
  done
  echo "LINUX balloon inflated_pages=${inf:-none} deflated_pages=${def:-none}"
fi
# pv.tick=N: N lines a second apart with the wall clock, the uptime and MemTotal (snapshot and
# balloon tests).
t="$(arg pv.tick)"
i=0
while [ -n "$t" ] && [ "$i" -lt "$t" ]; do
  i=$((i + 1))
  echo "LINUX tick n=$i epoch=$(date +%s) uptime=$(cut -d' ' -f1 /proc/uptime) memtotal_kb=$(awk '/^MemTotal/{print $2}' /proc/meminfo)"
  sleep 1
done
# pv.screen=1 (the display guest, a kernel with virtio_gpu): report the framebuffer fbcon drew
# on and the input devices, draw a 24-cell reverse-video bar at the start of row 2 of tty1
# (cursor hidden), then read one line typed on the keyboard (tty1 echoes it on the screen;
# at most 120 s) and report it.
if [ "$(arg pv.screen)" = 1 ]; then
  i=0
  while [ ! -e /sys/class/graphics/fb0 ] && [ "$i" -lt 30 ]; do sleep 1; i=$((i + 1)); done
  echo "LINUX fb name=$(tr ' ' _ </sys/class/graphics/fb0/name 2>/dev/null) size=$(cat /sys/class/graphics/fb0/virtual_size 2>/dev/null) con=$(tr ' ' _ </sys/class/vtconsole/vtcon1/name 2>/dev/null)"
  for n in /sys/class/input/input*/name; do
    [ -e "$n" ] && echo "LINUX input name=$(tr ' ' _ <"$n")"
  done
  exec 3</dev/tty1
  printf '\033[?25l\033[2J\033[H\n\n\033[7m%24s\033[0m\npocketvisor\n' '' >/dev/tty1
  echo "LINUX screen drawn"
  if read -r -t 120 line <&3; then echo "LINUX typed line=$line"; else echo "LINUX typed none"; fi
  exec 3<&-
fi
# Kernel log lines the tests judge (quiet keeps them off the console).
dmesg | grep -E 'WARNING:|BUG:|Oops|Call Trace|rtc_cmos|XSAVE consistency|TSC.*(unstable|unsynchron)' | sed 's/^/LINUX klog /'
if grep -q 'pv.shell=1' /proc/cmdline; then
  echo "LINUX shell (exit to power off)"
  setsid cttyhack sh
fi
echo "LINUX done"
sync
if [ "$(arg pv.reboot)" = 1 ]; then echo "LINUX rebooting"; reboot -f; fi
poweroff -f
INIT
chmod 755 "$root/init"

(cd "$root" && find . -print | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -9 >"$out/initramfs.cpio.gz"
rm -rf "$work"
log "done: $out/{vmlinux,bzImage,initramfs.cpio.gz} ($release)"
ls -l "$out" >&2
