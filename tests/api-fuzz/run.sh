#!/usr/bin/env bash
# Fuzzes the handset daemon's REST API through its OpenAPI document with schemathesis (a
# third-party fuzzer from PyPI), so the document and the server cannot drift apart: every
# answer must be documented (status, content type, schema), no 5xx, schema-invalid requests
# refused, a wrong method a 405 with Allow. A real daemon on a temporary state directory;
# loopback only (tests/api-fuzz/uds_proxy.py relays 127.0.0.1 to its unix socket).
#
# Bounded: FUZZ_API_SECONDS (default 90) of fuzzing, at most 25 cases per operation and
# phase, a 120 s request timeout (a many-GiB guest suspends slowly under load), everything
# under `timeout`. Without PyPI it says so loudly and exits 0 (skipped, not passed).
# Afterwards no VMM of the daemon may be left running.
#
# Usage: tests/api-fuzz/run.sh   (root; target/debug/pocketvisor and guest/out/probe.elf built)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
pv=${PV:-$root/target/debug/pocketvisor}
secs=${FUZZ_API_SECONDS:-90}
venv=${SCHEMATHESIS_VENV:-$root/target/schemathesis-venv}

# A venv names its own path in its scripts: one moved with the tree (a copied target/) no
# longer runs, and is made again.
if ! "$venv/bin/schemathesis" --version >/dev/null 2>&1; then
  rm -rf "$venv"
  if ! { python3 -m venv "$venv" &&
    timeout 300 "$venv/bin/pip" install --quiet 'schemathesis>=4.0,<5'; }; then
    echo "=================================================================="
    echo "api-fuzz: SKIPPED: cannot install schemathesis from PyPI (pip failed);"
    echo "the API document was NOT checked against the daemon by the fuzzer."
    echo "=================================================================="
    rm -rf "$venv"
    exit 0
  fi
fi

work=$(mktemp -d /tmp/pv-apifuzz.XXXXXX)
daemon=
proxy=
cleanup() {
  [ -n "$proxy" ] && kill "$proxy" 2>/dev/null || true
  if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then
    kill -TERM "$daemon" 2>/dev/null || true
    for _ in $(seq 1 120); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$daemon" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

"$pv" handset --state-dir "$work/state" >"$work/daemon.log" 2>&1 &
daemon=$!
python3 tests/api-fuzz/uds_proxy.py "$work/state/handset.sock" "$work/port" 2>"$work/proxy.log" &
proxy=$!
for _ in $(seq 1 100); do
  [ -S "$work/state/handset.sock" ] && [ -s "$work/port" ] && break
  sleep 0.1
done
port=$(cat "$work/port")
echo "api-fuzz: daemon pid $daemon on $work/state/handset.sock, relayed from 127.0.0.1:$port"

rc=0
(cd tests/api-fuzz && timeout $((secs + 300)) "$venv/bin/schemathesis" --no-color \
  --config-file "$root/tests/api-fuzz/schemathesis.toml" run \
  "$root/docs/api/handset.openapi.yaml" --url "http://127.0.0.1:$port" \
  --max-time "$secs" --max-examples 25 --workers 1 --request-timeout 120 \
  --checks all --exclude-checks ignored_auth,object_level_authorization \
  --suppress-health-check too_slow,filter_too_much \
  --report junit --report-dir "$work/report") || rc=$?

# The daemon stops cleanly (suspending or stopping what the fuzzer started) and leaves no VMM.
kill -TERM "$daemon"
for _ in $(seq 1 240); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$daemon" 2>/dev/null; then
  echo "api-fuzz: FAILED: the daemon did not stop within 120 s of SIGTERM"
  rc=1
fi
wait "$daemon" || true
daemon=
kill "$proxy" 2>/dev/null || true
proxy=
left=$(pgrep -f -- "pocketvisor.*$work/state" || true)
if [ -n "$left" ]; then
  echo "api-fuzz: FAILED: VMM processes left after the daemon stopped: $left"
  ps -o pid,args -p "$(echo "$left" | paste -sd,)" || true
  kill -KILL $left 2>/dev/null || true
  rc=1
fi
if grep -q 'panicked' "$work/daemon.log"; then
  echo "api-fuzz: FAILED: the daemon panicked:"
  grep -B2 -A5 'panicked' "$work/daemon.log" | head -40
  rc=1
fi
echo "api-fuzz: daemon log: $(wc -l <"$work/daemon.log") lines, tail:"
tail -5 "$work/daemon.log"
echo "api-fuzz: rc $rc"
exit $rc
