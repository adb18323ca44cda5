#!/usr/bin/env bash
# make demo: the handset with its two profiles, work and personal, each a probe guest drawing its
# home screen on its own virtio-gpu display. Prints where to watch and touch them (VNC and the
# browser phone), saves a screenshot of each, and on a terminal runs until Ctrl-C; the daemon then
# suspends both to disk, and the next `make demo` resumes them where they stopped.
#
# Environment: DEMO_STATE (state directory, default guest/out/demo-handset), DEMO_SECONDS (how
# long to run when standard input is not a terminal, default 10).
set -euo pipefail
cd "$(dirname "$0")/.."

pv=target/debug/pocketvisor
state="${DEMO_STATE:-guest/out/demo-handset}"
seconds="${DEMO_SECONDS:-10}"
say() { printf '\ndemo: %s\n' "$*"; }

mkdir -p "$state"
state="$(cd "$state" && pwd)"
profile() { "$pv" profile --state-dir "$state" "$@"; }

say "the handset daemon over $state (log: $state/demo-daemon.log)"
"$pv" handset --state-dir "$state" >"$state/demo-daemon.log" 2>&1 &
daemon=$!
stop_daemon() {
  if kill -0 "$daemon" 2>/dev/null; then
    say "stopping the daemon: it suspends both profiles to disk (the next make demo resumes them)"
    kill -TERM "$daemon"
    wait "$daemon" || true
  fi
}
trap stop_daemon EXIT
for _ in $(seq 100); do
  profile list >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { cat "$state/demo-daemon.log"; exit 1; }
  sleep 0.1
done

# name, colour of its home screen
for p in "work 1d4ed8" "personal e76f51"; do
  set -- $p
  if ! profile show "$1" >/dev/null 2>&1; then
    spec="$state/demo-$1.toml"
    cat >"$spec" <<SPEC
name = "$1"
kernel = "probe"
cmdline = "pv.mode=screen pv.screen.rgb=$2 pv.screen.ms=1000"
memory_mib = 128
screen = true
autostart = true
on_shutdown = "suspend"
SPEC
    profile create --file "$spec"
  fi
  # A profile suspended by the last demo was resumed by the daemon (autostart).
  case "$(profile show "$1" --json)" in
    *'"state": "stopped"'* | *'"state":"stopped"'*) profile start "$1" ;;
  esac
done
profile switch work
profile list
say "where to see them:"
profile view work
profile view personal
# The probe draws its first frame 1-3 s after boot (a big frame under software KVM, at load):
# wait for it in each guest's serial log (a resumed guest shows its last frame at once).
for p in work personal; do
  for _ in $(seq 150); do
    profile logs "$p" 2>/dev/null | grep -q "PROBE screen frame" && break
    sleep 0.2
  done
done
for p in work personal; do
  profile screenshot "$p" -o "$state/$p.png" || say "no screenshot of $p (see the error above)"
done

if [ -t 0 ]; then
  say "open the phone address above in a browser (or a VNC viewer on the vnc address);" \
    "'$pv profile --state-dir $state switch personal' switches. Ctrl-C ends the demo."
  trap 'stop_daemon; exit 0' INT TERM
  wait "$daemon"
else
  say "running for ${seconds}s (standard input is not a terminal)"
  sleep "$seconds"
fi
