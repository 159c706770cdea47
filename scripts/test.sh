#!/usr/bin/env bash
# One command to test: installs what is missing (nats-server, PostgreSQL, the NATS C client,
# nats-py), checks formatting and lints, then runs every test. Tests start their own
# nats-server and PostgreSQL on free ports with temporary directories.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh test)"
cargo fmt --all -- --check
npm --prefix web run --silent check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace "$@"
