#!/usr/bin/env bash
# Cold download of a large file through an edge vs a plain S3 GET of the same object (see
# tests/src/bin/cold_read_bench.rs). Real release processes on loopback and SeaweedFS; bounded
# (about a minute).   BENCH_MIB=256 scripts/bench-cold-read.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
install_seaweedfs
cargo build --release -q -p mxcas -p mxcas-tests --bins
TARGET="${CARGO_TARGET_DIR:-$PWD/target}/release"
MXCAS_BIN="$TARGET/mxcas" "$TARGET/cold_read_bench"
