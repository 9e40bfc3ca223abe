#!/usr/bin/env bash
# Verified multi-source fetch of ipfs: media: one throttled gateway vs three vs three and a
# liar (see tests/src/bin/multi_source_bench.rs). Bounded (about a minute).
#   BENCH_MIB=24 BENCH_RATE=4000000 scripts/bench-multi-source.sh
set -euo pipefail
cd "$(dirname "$0")/.."
(cd tests/oracle && [ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error)
cargo build --release -q -p mxcas -p mxcas-tests --bins
TARGET="${CARGO_TARGET_DIR:-$PWD/target}/release"
MXCAS_BIN="$TARGET/mxcas" "$TARGET/multi_source_bench"
