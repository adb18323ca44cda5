#!/usr/bin/env bash
# Build a whole Debian disk image that firmware boots: the guest pocketvisor runs with
# `--firmware` (SeaBIOS or OVMF) instead of `--kernel`.
#
# Output (guest/out/disk/):
#   debian.raw   2 GiB sparse raw image, GPT with three partitions:
#                  1  BIOS boot (1 MiB): GRUB's i386-pc core.img (SeaBIOS boots the MBR)
#                  2  EFI system (64 MiB, FAT): GRUB's x86_64-efi image as \EFI\BOOT\BOOTX64.EFI
#                  3  Linux root (ext4): Debian bookworm from debootstrap, linux-image-cloud-amd64,
#                     systemd, /boot/grub/grub.cfg (no menu, console=ttyS0 quiet)
#   inputs       the hash of this script; the image is rebuilt only when it changes
#
# The guest: root logs in automatically on the serial getty (ttyS0). When a second disk
# (/dev/vdb) is attached whose first bytes are "#!/bin/sh", `pv-disk-script.service` runs it
# once the system is up: the tests use it to run a command and power off.
#
# No loop devices: the root file system is made from a directory (mkfs.ext4 -d), the ESP with
# mtools, and the GRUB boot sectors are written and patched in the file directly.
#
# Needs (root): debootstrap, e2fsprogs (mkfs.ext4 -d), fdisk (sfdisk), grub-pc-bin,
# grub-efi-amd64-bin (grub-mkimage and the modules), mtools, dosfstools; the configured apt
# mirror. Takes about 5-10 minutes the first time (debootstrap), seconds when cached.
#
# Environment:
#   OUT_DIR    output directory (default guest/out/disk)
#   MIRROR     Debian mirror (default: the first deb.debian.org-style URI apt is configured with)
#   SUITE      Debian suite (default bookworm)
#   TIMEOUT    seconds debootstrap may take (default 1500)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT_DIR:-$here/out/disk}"
suite="${SUITE:-bookworm}"
image="$out/debian.raw"
stamp="$out/inputs"

log() { printf 'build-disk-image: %s\n' "$*" >&2; }
die() { printf 'build-disk-image: error: %s\n' "$*" >&2; exit 1; }

inputs="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1) $suite"
if [[ -f "$image" && -f "$stamp" && "$(cat "$stamp")" == "$inputs" ]]; then
  log "cached: $image"
  exit 0
fi

[[ $(id -u) == 0 ]] || die "debootstrap needs root"
for tool in debootstrap mkfs.ext4 sfdisk grub-mkimage mformat mcopy mmd mkfs.vfat; do
  command -v "$tool" >/dev/null ||
    die "missing tool: $tool (apt-get install debootstrap e2fsprogs fdisk grub-pc-bin grub-efi-amd64-bin mtools dosfstools)"
done
[[ -f /usr/lib/grub/i386-pc/boot.img ]] || die "missing GRUB i386-pc modules: apt-get install grub-pc-bin"
[[ -d /usr/lib/grub/x86_64-efi ]] || die "missing GRUB x86_64-efi modules: apt-get install grub-efi-amd64-bin"

mirror="${MIRROR:-}"
if [[ -z "$mirror" ]]; then
  mirror="$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
    head -n1 | tr -d ' ')" || true
  mirror="${mirror:-http://deb.debian.org/debian}"
fi

mkdir -p "$out"
work="$(mktemp -d "$out/work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"

# ---------------------------------------------------------------- the root file system
log "debootstrap $suite from $mirror (minbase + kernel + systemd)"
timeout "${TIMEOUT:-1500}" debootstrap --variant=minbase \
  --include=systemd-sysv,udev,linux-image-cloud-amd64,initramfs-tools,kmod,procps,e2fsprogs \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }

echo pocketvisor-guest >"$root/etc/hostname"
cat >"$root/etc/fstab" <<'EOF'
/dev/vda3 / ext4 defaults,errors=remount-ro 0 1
EOF
# Root logs in on the serial console without a password (a test image, not a product).
mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
cat >"$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 - $TERM
EOF
ln -sf /lib/systemd/system/serial-getty@.service \
  "$root/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"

# The test hook: a script on a second disk runs once the system is up.
cat >"$root/usr/local/sbin/pv-disk-script" <<'EOF'
#!/bin/sh
# Runs the shell script stored at the start of /dev/vdb (it must begin with "#!/bin/sh").
head -c 9 /dev/vdb | grep -q '^#!/bin/sh' || { echo "pv-disk-script: /dev/vdb holds no script"; exit 0; }
head -c 65536 /dev/vdb | tr -d '\000' >/run/pv-disk-script
exec /bin/sh /run/pv-disk-script
EOF
chmod 755 "$root/usr/local/sbin/pv-disk-script"
cat >"$root/etc/systemd/system/pv-disk-script.service" <<'EOF'
[Unit]
Description=Run the script on the second disk (pocketvisor tests)
ConditionPathExists=/dev/vdb
After=multi-user.target getty.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/pv-disk-script
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/pv-disk-script.service \
  "$root/etc/systemd/system/multi-user.target.wants/pv-disk-script.service"

kver="$(basename "$(ls -d "$root"/lib/modules/* | head -n1)")"
[[ -f "$root/boot/vmlinuz-$kver" && -f "$root/boot/initrd.img-$kver" ]] ||
  die "debootstrap left no kernel/initrd in /boot"

# GRUB: the same grub.cfg serves the BIOS and the EFI image (both use a serial terminal).
mkdir -p "$root/boot/grub"
cat >"$root/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
set timeout_style=hidden
set default=0
menuentry "Debian GNU/Linux ($kver)" {
  linux /boot/vmlinuz-$kver root=/dev/vda3 ro console=ttyS0,115200 quiet panic=-1
  initrd /boot/initrd.img-$kver
}
EOF
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*

# ---------------------------------------------------------------- the image
# GPT: BIOS boot at 1 MiB (1 MiB), ESP at 2 MiB (64 MiB), root at 66 MiB (1981 MiB).
raw="$work/debian.raw"
truncate -s 2G "$raw"
sfdisk --quiet "$raw" <<'EOF'
label: gpt
start=2048, size=2048, type=21686148-6449-6E61-6E6F-744E656564EF, name="bios"
start=4096, size=131072, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp"
start=135168, size=4057088, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
EOF
# The root partition ends 1 MiB before the end of the disk (the backup GPT lives there).
root_start=135168
root_sectors=4057088

log "mkfs.ext4 -d (root, $((root_sectors / 2048)) MiB)"
mkfs.ext4 -q -F -L root -d "$root" -E offset=$((root_start * 512)) "$raw" "$((root_sectors / 2))k"

# ESP: FAT with GRUB's EFI image as the removable-media default loader.
modules="part_gpt part_msdos ext2 fat normal linux configfile search echo test serial terminal cat ls gzio"
grub-mkimage -O x86_64-efi -p '(hd0,gpt3)/boot/grub' -o "$work/BOOTX64.EFI" $modules efi_gop
esp="$work/esp.img"
truncate -s 64M "$esp"
mkfs.vfat -n ESP "$esp" >/dev/null
mmd -i "$esp" ::/EFI ::/EFI/BOOT
mcopy -i "$esp" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
dd if="$esp" of="$raw" bs=512 seek=4096 conv=notrunc status=none

# BIOS: boot.img in the MBR (the protective partition table kept), core.img in the BIOS boot
# partition; the two pointers grub-bios-setup would write are patched here.
grub-mkimage -O i386-pc -p '(hd0,gpt3)/boot/grub' -o "$work/core.img" biosdisk $modules
core_sectors=$(( ($(stat -c %s "$work/core.img") + 511) / 512 ))
(( core_sectors <= 2048 )) || die "core.img ($core_sectors sectors) does not fit the BIOS boot partition"
dd if="$work/core.img" of="$raw" bs=512 seek=2048 conv=notrunc status=none
dd if=/usr/lib/grub/i386-pc/boot.img of="$raw" bs=440 count=1 conv=notrunc status=none
le() { # le VALUE BYTES: VALUE as little-endian bytes
  local v=$1 n=$2 i
  for ((i = 0; i < n; i++)); do printf "\\x$(printf %02x $(( (v >> (8 * i)) & 255 )))"; done
}
# boot.img: the LBA of core.img's first sector (GRUB_BOOT_MACHINE_KERNEL_SECTOR, 0x5c).
le 2048 8 | dd of="$raw" bs=1 seek=$((0x5c)) conv=notrunc status=none
# diskboot.img (core.img's first sector): its block list, at the end of the sector: the rest
# of core.img starts at LBA 2049, core_sectors - 1 sectors, loaded at segment 0x820.
bl=$((2048 * 512 + 0x200 - 12))
{ le 2049 8; le $((core_sectors - 1)) 2; le $((0x820)) 2; } |
  dd of="$raw" bs=1 seek=$bl conv=notrunc status=none

mv "$raw" "$image"
echo "$inputs" >"$stamp"
log "built $image (kernel $kver)"
