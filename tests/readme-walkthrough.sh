#!/usr/bin/env bash
# The README walk-through as a test: every ```sh block of README.md is either marked
# `sh walkthrough` (this script runs it) or preceded by a `<!-- walkthrough skip: REASON -->`
# line (this script prints the reason); an unmarked block fails, so a new example cannot
# silently go unchecked. Marked blocks run in order, each command under a timeout, with
# target/debug first on PATH and every /tmp/ path moved into a fresh temporary directory.
# A command ending in `&` runs in the background until the end; the next command waits for
# the unix sockets (`*.sock`) it names. Each command must exit 0, and a command whose comment
# says `prints "PATTERN"` must print a line matching that extended regular expression (so the
# README's claims about output are checked, not only exit codes).
#
# Usage: tests/readme-walkthrough.sh [README]   (from the repository root; make test runs it)
set -euo pipefail

readme=${1:-README.md}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ ! -e /dev/kvm ]; then
    echo "SKIP (no /dev/kvm): README walk-through" >&2
    exit 0
fi
for f in target/debug/pocketvisor guest/out/probe.elf; do
    [ -f "$f" ] || { echo "readme-walkthrough: $f missing (run make build first)" >&2; exit 1; }
done

tmp=$(mktemp -d /tmp/pv-walkthrough.XXXXXX)
bg_pids=()
cleanup() {
    local pid
    for pid in "${bg_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${bg_pids[@]}"; do
        # The daemon suspends or stops its profiles on SIGTERM; give it time, then insist.
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
export PATH="$root/target/debug:$PATH"

# Commands of the marked blocks, one per line (continuations joined), prefixed by the
# README line of their block; skipped blocks as "SKIP <line> <reason>".
commands=$(awk '
    /^<!-- walkthrough skip: .* -->$/ { reason = $0; sub(/^<!-- walkthrough skip: /, "", reason); sub(/ -->$/, "", reason); next }
    !inblock && /^```sh( |$)/ {
        inblock = 1; start = NR; run = ($0 ~ /^```sh walkthrough$/)
        if (!run && reason == "") { print "UNMARKED " NR; }
        else if (!run) { print "SKIP " NR " " reason }
        reason = ""; cmd = ""; next
    }
    inblock && /^```$/ { inblock = 0; next }
    inblock && run {
        line = $0
        if (line ~ /\\$/) { sub(/\\$/, "", line); cmd = cmd line; next }
        cmd = cmd line
        if (cmd ~ /[^ ]/) print "RUN " start " " cmd
        cmd = ""
        next
    }
    !inblock && !/^[ \t]*$/ { reason = "" }
' "$readme")

unmarked=$(grep '^UNMARKED ' <<<"$commands" || true)
if [ -n "$unmarked" ]; then
    echo "readme-walkthrough: README blocks with neither \`sh walkthrough\` nor a skip reason, at lines:" \
        $(cut -d' ' -f2 <<<"$unmarked") >&2
    exit 1
fi

ran=0
checked=0
while IFS= read -r entry; do
    kind=${entry%% *}
    rest=${entry#* }
    line=${rest%% *}
    if [ "$kind" = SKIP ]; then
        echo "readme-walkthrough: SKIP block at README line $line: ${rest#* }"
        continue
    fi
    cmd=${rest#* }
    cmd=${cmd//\/tmp\//$tmp/}
    echo "readme-walkthrough: [README:$line] $cmd"
    # Wait for the sockets an earlier background command serves.
    for sock in $(grep -o "$tmp/[^ ]*\.sock" <<<"$cmd" || true); do
        for _ in $(seq 120); do [ -S "$sock" ] && break; sleep 0.25; done
    done
    if [[ $cmd =~ \&[[:space:]]*$ ]]; then
        bash -c "exec ${cmd%&*}" >"$tmp/bg-$ran.log" 2>&1 &
        bg_pids+=("$!")
        # A daemon's socket is DIR/handset.sock for --state-dir DIR.
        if [[ $cmd =~ handset\ --state-dir\ ([^ ]+) ]]; then
            sock="${BASH_REMATCH[1]}/handset.sock"
            for _ in $(seq 120); do [ -S "$sock" ] && break; sleep 0.25; done
            [ -S "$sock" ] || { echo "readme-walkthrough: no $sock after 30 s:" >&2; cat "$tmp/bg-$ran.log" >&2; exit 1; }
        fi
    else
        out="$tmp/out-$ran.txt"
        if ! timeout 180 bash -c "$cmd" >"$out"; then
            cat "$out"
            echo "readme-walkthrough: FAILED [README:$line] $cmd" >&2
            for log in "$tmp"/bg-*.log; do [ -f "$log" ] && tail -20 "$log" >&2; done
            exit 1
        fi
        cat "$out"
        if [[ $cmd =~ \#.*prints\ \"([^\"]*)\" ]]; then
            pattern=${BASH_REMATCH[1]}
            if ! grep -Eq -- "$pattern" "$out"; then
                echo "readme-walkthrough: FAILED [README:$line] output has no line matching \"$pattern\"" >&2
                exit 1
            fi
            echo "readme-walkthrough: output matches \"$pattern\""
            checked=$((checked + 1))
        fi
    fi
    ran=$((ran + 1))
done < <(grep -E '^(RUN|SKIP) ' <<<"$commands")

[ "$ran" -gt 0 ] || { echo "readme-walkthrough: no walkthrough commands found in $readme" >&2; exit 1; }
echo "readme-walkthrough: ok ($ran commands, $checked outputs checked)"
