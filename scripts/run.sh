#!/usr/bin/env bash
# One command to run: installs what is missing, builds, and starts fleetpipe on this machine
# with a managed nats-server, the embedded store and a simulated fleet.
#   scripts/run.sh                       1,000 simulated vehicles
#   scripts/run.sh --simulate 5000 --payload json
# Extra arguments go to `fleetpipe up`. Ctrl-C stops everything in order.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh run)"
cargo build --release --quiet -p fleetpipe
args=("$@")
[[ " ${args[*]-} " == *" --simulate "* ]] || args=(--simulate 1000 "${args[@]}")
exec "${CARGO_TARGET_DIR:-target}/release/fleetpipe" up "${args[@]}"
