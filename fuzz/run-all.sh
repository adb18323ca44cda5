#!/bin/sh
# Runs every fuzz target for FUZZ_SECONDS (default 60) each, one after the other, and prints
# libFuzzer's final counts per target. Stops at the first crash (its input is left in
# fuzz/artifacts/<target>/). Needs nightly and cargo-fuzz; installs cargo-fuzz if missing.
set -eu
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
python3 seeds/make_seeds.py
for t in $(cargo +nightly fuzz list); do
    echo "== $t (${secs} s)"
    cargo +nightly fuzz run -O "$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 |
        grep -E '^(stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb)|ERROR|SUMMARY'
done
