# pocketvisor: build, demo, test and benchmark entry points.
#
#   make demo    build everything and run the handset with its work and personal profiles
#                (and boot Linux where hardware KVM exists)
#   make test    build the VMM, the probe and the guest assets, then run every test (test-nested
#                too) and the README walk-through (tests/readme-walkthrough.sh)
#   Both install missing Debian packages and rustup targets first (scripts/deps.sh; root).
#   make test-api-fuzz  schemathesis against the handset daemon's API document (PyPI; bounded)
#   make test-nested  the hardware-path checks inside L1, a QEMU TCG machine with nested SVM
#   make test-nested-arm64  the arm64 port's checks inside an arm64 L1 (QEMU TCG with EL2)
#   make build-arm64  the static aarch64 pocketvisor (target/aarch64-unknown-linux-musl)
#   make bench   pocketvisor vs QEMU on the probe guest
#   make linux   build the Linux guest assets from Debian packages (guest/out/linux)
#   make disk-image  the whole Debian disk image firmware boots (guest/out/disk; root, debootstrap)
#   make lint    rustfmt --check and clippy -D warnings over the workspace and the guest crates
#   make fuzz    every cargo-fuzz target for FUZZ_SECONDS (default 60) each (nightly; not in CI)

CARGO ?= cargo
PROBE := guest/out/probe.elf
PV := target/debug/pocketvisor
DEMO_DISK := guest/out/demo.img
LINUX := guest/out/linux
# The display guest: Debian's generic kernel (the cloud one has no DRM) with virtio_gpu.
LINUX_GPU := guest/out/linux-gpu
# The arm64 L1's assets (tests/nested/build-l1.sh with NESTED_ARCH=arm64).
ARM64_NESTED := guest/out/nested-arm64

.PHONY: all deps deps-all build build-arm64 probe demo test test-api-fuzz test-nested test-nested-arm64 bench linux disk-image lint fuzz

all: build

# Debian packages and rustup targets, installed where missing (apt-get needs root): deps for
# building and the x86 tests, deps-all also for the arm64 port and the firmware disk image.
deps:
	scripts/deps.sh

deps-all:
	scripts/deps.sh --all

probe:
	guest/build-probe.sh

disk-image:
	guest/build-disk-image.sh

build: deps probe
	$(CARGO) build -p pocketvisor

$(DEMO_DISK):
	mkdir -p guest/out
	truncate -s 8M $@

# The handset with two profiles on screens (scripts/demo.sh: on a terminal until Ctrl-C), then,
# where the host has hardware virtualization, the Debian Linux guest on its own.
demo: build $(DEMO_DISK)
	$(PV) doctor
	scripts/demo.sh
	@if $(PV) doctor --json | grep -q '"linux": true'; then \
		guest/build-linux.sh && \
		$(PV) run --kernel $(LINUX)/vmlinux --initrd $(LINUX)/initramfs.cpio.gz \
			--memory 512M --vcpus 2 --disk $(DEMO_DISK) --rng --cmdline "console=ttyS0 quiet"; \
	else \
		echo "demo: Linux guest skipped: this host has no hardware virtualization (see doctor above)"; \
	fi

# The guest assets the tests boot are built first (each script caches its output): the Debian
# Linux guest and the firmware-booted disk image.
test: deps-all build $(LINUX)/initramfs.cpio.gz disk-image
	$(CARGO) test --workspace --no-fail-fast
	tests/readme-walkthrough.sh
	$(MAKE) test-api-fuzz
	$(MAKE) test-nested
	$(MAKE) test-nested-arm64

# schemathesis (PyPI) against a real handset daemon through docs/api/handset.openapi.yaml,
# loopback only, FUZZ_API_SECONDS (default 90) of fuzzing; skipped loudly without PyPI.
test-api-fuzz: build
	tests/api-fuzz/run.sh

# One L1 boot (about 3 min under TCG) runs every check of tests/tests/nested.rs but the firmware
# ones, a second L1 those (SeaBIOS booting the Debian disk image, 1-3 min): a jailed VMM started
# right after the firmware boot in the same L1 overran the handset's 10 s API wait in 4 of 4
# runs (see README, "Firmware and disk images"). The L1 assets are built on first use
# (tests/nested/build-l1.sh), the Linux guest and the disk image here when missing.
test-nested: build $(LINUX)/initramfs.cpio.gz $(LINUX_GPU)/initramfs.cpio.gz
	@# A Linux guest under nested TCG has been seen to hang in about one L1 boot in four (see
	@# README, "nested"); a failed group gets one more whole L1 boot, and it fails if that does.
	NESTED_FILTER="--skip firmware::" $(CARGO) test -p e2e --features nested --test nested -- --skip firmware:: || { \
		echo "test-nested: FAILED once; running the whole group again in a new L1"; \
		NESTED_FILTER="--skip firmware::" $(CARGO) test -p e2e --features nested --test nested -- --skip firmware::; }
	guest/build-disk-image.sh
	@# A firmware boot has once triple-faulted right after GRUB handed over to Linux (1 run
	@# in 7, not understood yet): like the group, it gets one more L1 boot.
	NESTED_FILTER="firmware::" $(CARGO) test -p e2e --features nested --test nested -- firmware:: || { \
		echo "test-nested: the firmware checks FAILED once; running them again in a new L1"; \
		NESTED_FILTER="firmware::" $(CARGO) test -p e2e --features nested --test nested -- firmware::; }

# Needs rustup target aarch64-unknown-linux-musl and gcc-aarch64-linux-gnu (bundled SQLite's C);
# .cargo/config.toml names the linker (rust-lld) and the C compiler.
build-arm64: deps-all
	$(CARGO) build --target aarch64-unknown-linux-musl -p pocketvisor -p rawexit-arm64

# Each check boots its own arm64 L1 (qemu-system-aarch64 TCG with EL2, about 4 s to a shell);
# the assets are built on first use (NESTED_ARCH=arm64 tests/nested/build-l1.sh), and Debian's
# arm64 QEMU, which one check runs inside L1 beside pocketvisor, is unpacked once
# (tests/nested/build-qemu-arm64-root.sh, about 250 MB of packages).
test-nested-arm64: build-arm64 $(ARM64_NESTED)/guest-initramfs.cpio.gz
	tests/nested/build-qemu-arm64-root.sh
	@# Like the x86 group, a failed arm64 group gets one more whole run: seen once each in
	@# 2026-12-06's runs, a Debian guest under pKVM silent after its init until the deadline,
	@# and the balloon command's answer lost to the guest's reboot; each passed on its next run.
	$(CARGO) test -p e2e --features nested --test nested_arm64 || { \
		echo "test-nested-arm64: FAILED once; running the whole group again"; \
		$(CARGO) test -p e2e --features nested --test nested_arm64; }

# The arm64 L1 and its guest's initramfs, which carries the guest agent built for aarch64: the
# harness rebuilds them when build-l1.sh or an init script changes, make also when the agent
# does.
$(ARM64_NESTED)/guest-initramfs.cpio.gz: $(wildcard guest/agent/src/*.rs) guest/agent/Cargo.toml
	NESTED_ARCH=arm64 tests/nested/build-l1.sh

# The Linux guest (kernel, initramfs with the guest agent), rebuilt when its recipe or the
# agent changes.
$(LINUX)/initramfs.cpio.gz: guest/build-linux.sh $(wildcard guest/agent/src/*.rs)
	guest/build-linux.sh

$(LINUX_GPU)/initramfs.cpio.gz: guest/build-linux.sh $(wildcard guest/agent/src/*.rs)
	KERNEL_PKG=linux-image-amd64 EXTRA_MODULES=virtio_gpu OUT_DIR=$(CURDIR)/$(LINUX_GPU) guest/build-linux.sh

bench: probe
	$(CARGO) run -p bench --release -- $(BENCH_ARGS)

linux:
	guest/build-linux.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p e2e --features nested --all-targets -- -D warnings
	cd guest/probe && $(CARGO) fmt -- --check && $(CARGO) clippy --release --target x86_64-unknown-none -- -D warnings
	cd guest/probe && $(CARGO) clippy --release --target aarch64-unknown-none --features arm64 --bin probe-arm64 -- -D warnings
	cd guest/agent && $(CARGO) fmt -- --check && $(CARGO) clippy -- -D warnings

fuzz:
	fuzz/run-all.sh
