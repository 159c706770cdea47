#!/usr/bin/env bash
# Measures fleetpipe-agent as BENCHMARKS.md reports it: the size of the release-agent
# binary, and its RSS and CPU with 10 sensors × 10 Hz publishing to a local nats-server
# with the pipeline's telemetry stream.
#   scripts/agent-bench.sh [SECONDS]      (default 60; the first 5 s are not counted)
# Needs cargo and nats-server (scripts/setup.sh run installs it). Builds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
eval "$(scripts/setup.sh run)"
nats=${FLEETPIPE_NATS_SERVER:-nats-server}
target=${CARGO_TARGET_DIR:-target}

cargo build --quiet --profile release-agent -p fleetpipe-agent
cargo build --quiet -p fleetpipe          # `fleetpipe init` creates the stream and buckets
agent="$target/release-agent/fleetpipe-agent"
fleetpipe="$target/debug/fleetpipe"

work=$(mktemp -d)
cleanup() {
  [ -n "${apid:-}" ] && kill "$apid" 2>/dev/null || true
  [ -n "${npid:-}" ] && kill "$npid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$nats" -js -a 127.0.0.1 -p "$port" -sd "$work/nats" >/dev/null 2>&1 &
npid=$!
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
url="nats://127.0.0.1:$port"
"$fleetpipe" --nats-url "$url" --data-dir "$work" --store "sqlite://$work/fp.db" init >/dev/null

{
  echo "device = \"bench-1\""
  echo "urls = [\"$url\"]"
  echo "[buffer]"
  echo "dir = \"$work/buffer\""
  for i in $(seq 0 9); do
    printf '[[sensor]]\nname = "s%d"\nsource = "simulated"\nsignal = "sine"\nrate_hz = 10\nunit = "u"\n' "$i"
  done
} >"$work/agent.toml"
"$agent" --config "$work/agent.toml" --log warn &
apid=$!

ticks() { awk '{print $14 + $15}' "/proc/$apid/stat"; }
hz=$(getconf CLK_TCK)
sleep 5
t0=$(date +%s.%N); c0=$(ticks)
sleep "$secs"
t1=$(date +%s.%N); c1=$(ticks)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$apid/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$apid/status")
acked=$("$agent" status --json --config "$work/agent.toml" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["counters"]["readings_acknowledged"], s["counters"]["acknowledged"])')

size=$(stat -c %s "$agent")
python3 - "$size" "$rss" "$hwm" "$c0" "$c1" "$hz" "$t0" "$t1" $acked <<'PY'
import sys
size, rss, hwm, c0, c1, hz = map(int, sys.argv[1:7])
t0, t1 = map(float, sys.argv[7:9])
readings, messages = map(int, sys.argv[9:11])
cpu = (c1 - c0) / hz / (t1 - t0) * 100
print(f"binary      {size / 1e6:.2f} MB (release-agent, stripped)   target <= 8 MB")
print(f"RSS         {rss / 1024:.1f} MiB now, {hwm / 1024:.1f} MiB peak      target <= 10 MB")
print(f"CPU         {cpu:.2f} % of one core over {t1 - t0:.0f} s       target <= 1 %")
print(f"published   {readings} readings acknowledged in {messages} messages")
PY
