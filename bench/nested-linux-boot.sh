#!/usr/bin/env bash
# Linux boot on pocketvisor vs QEMU (-accel kvm, microvm and q35) inside one L1 of the nested
# harness (QEMU TCG with nested SVM; see README, "nested"): the same Debian kernel (PVH
# vmlinux), initramfs and command line (`console=ttyS0 quiet`), 512 MiB, 2 vCPUs, a virtio-blk
# disk and virtio-rng. For each of RUNS rounds it boots pocketvisor, microvm and q35 in turn
# and reports the time from the VMM's start to the guest's `LINUX ready` line and the VMM's
# peak RSS (VmHWM, sampled every 0.1 s until the guest says `LINUX done`). TCG timings: compare ratios.
#
# Needs: qemu-system-x86_64, the L1 assets (tests/nested/build-l1.sh, which `make test-nested`
# runs), the Linux guest (guest/build-linux.sh) and the pocketvisor binary (PV, default
# target/debug/pocketvisor). Usage: bench/nested-linux-boot.sh [RUNS] (default 3).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
runs="${1:-3}"
[[ "$runs" =~ ^[1-9][0-9]?$ ]] || { echo "usage: $0 [RUNS 1-99]" >&2; exit 2; }
pv="${PV:-$repo/target/debug/pocketvisor}"
nested="$repo/guest/out/nested"
linux="$repo/guest/out/linux"
for f in "$nested/vmlinuz" "$nested/initramfs.cpio.gz" "$linux/vmlinux" "$linux/initramfs.cpio.gz" "$pv"; do
  [[ -f "$f" ]] || { echo "$0: $f is missing (see the header of this script)" >&2; exit 1; }
done
command -v qemu-system-x86_64 >/dev/null || { echo "$0: qemu-system-x86_64 is not installed" >&2; exit 1; }

# The job directory must be under guest/out/nested/runs (L1's init keeps the checkout visible).
job="$nested/runs/bench-$(date +%s)-$$"
mkdir -p "$job"
echo "$job" >"$job/path"
echo "$repo" >"$job/repo"
cat >"$job/run" <<EOF
set -u
pv='$pv'; linux='$linux'; runs=$runs
EOF
cat >>"$job/run" <<'EOF'
cmdline="console=ttyS0 quiet"
disk=/tmp/bench-disk.img
truncate -s 8M "$disk"
# Starts "$@" with the console in /tmp/console, waits for LINUX ready and LINUX done, prints
# "ready_s peak_rss_kib", then ends the VMM.
measure() {
  : >/tmp/console
  t0=$(date +%s.%N)
  "$@" >/tmp/console 2>/tmp/vmm.err </dev/null &
  pid=$!
  ready=""; rss=""
  i=0
  while [ $i -lt 3000 ] && kill -0 $pid 2>/dev/null; do
    if [ -z "$ready" ] && grep -q 'LINUX ready' /tmp/console; then
      ready=$(echo "$(date +%s.%N) - $t0" | bc)
    fi
    # Sampled on every poll: the guest powers off right after LINUX done.
    hwm=$(awk '/^VmHWM/{print $2}' /proc/$pid/status 2>/dev/null)
    [ -n "$hwm" ] && rss=$hwm
    if [ -n "$ready" ] && grep -q 'LINUX done' /tmp/console; then
      break
    fi
    sleep 0.1
    i=$((i + 1))
  done
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  echo "${ready:-none} ${rss:-none}"
}
uptime
for r in $(seq 1 "$runs"); do
  set -- $(measure "$pv" run --kernel "$linux/vmlinux" --initrd "$linux/initramfs.cpio.gz" \
    --cmdline "$cmdline" --memory 512M --vcpus 2 --disk "$disk" --rng)
  echo "BENCH round=$r vmm=pocketvisor ready_s=$1 peak_rss_kib=$2"
  for m in microvm q35; do
    case $m in
      microvm) machine="microvm,pcie=on,rtc=on" ;;
      q35) machine="q35" ;;
    esac
    set -- $(measure qemu-system-x86_64 -accel kvm -cpu host -M "$machine" -m 512 -smp 2 \
      -nodefaults -no-user-config -display none -serial stdio -no-reboot \
      -kernel "$linux/vmlinux" -initrd "$linux/initramfs.cpio.gz" -append "$cmdline" \
      -drive "file=$disk,if=none,id=d0,format=raw" -device virtio-blk-pci,drive=d0 \
      -object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-pci,rng=rng0)
    echo "BENCH round=$r vmm=$m ready_s=$1 peak_rss_kib=$2"
  done
  uptime
done
EOF
echo "bench: host load $(cut -d' ' -f1-3 /proc/loadavg); booting L1 (job $job)" >&2
qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 3G -smp 2 \
  -append "console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off no_timer_check" \
  -virtfs "local,path=/,mount_tag=host,security_model=none,multidevs=remap,readonly=on" \
  -virtfs "local,path=$job,mount_tag=job,security_model=none,multidevs=remap" \
  -display none -monitor none -serial "file:$job/console.log" -no-reboot \
  -kernel "$nested/vmlinuz" -initrd "$nested/initramfs.cpio.gz" </dev/null
grep -h 'load average' "$job/output.log" | sed 's/^/L1: /' || true
echo "bench: host load $(cut -d' ' -f1-3 /proc/loadavg) after" >&2
grep '^BENCH ' "$job/output.log" || { echo "$0: no results; see $job" >&2; exit 1; }
# A summary per VMM: min / median / max of each figure.
grep '^BENCH ' "$job/output.log" | awk '
  { split($3, v, "="); split($4, r, "="); split($5, s, "=");
    vmm = v[2]; n[vmm]++; ready[vmm, n[vmm]] = r[2]; rss[vmm, n[vmm]] = s[2] }
  function sorted(a, vmm, k,   i, j, t, x) {
    for (i = 1; i <= k; i++) x[i] = a[vmm, i]
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (x[j] + 0 < x[i] + 0) { t = x[i]; x[i] = x[j]; x[j] = t }
    return sprintf("%s / %s / %s", x[1], x[int((k + 1) / 2)], x[k])
  }
  END {
    for (vmm in n) printf "%-12s ready s (min/median/max) %s   peak RSS KiB %s\n", vmm, sorted(ready, vmm, n[vmm]), sorted(rss, vmm, n[vmm])
  }'
