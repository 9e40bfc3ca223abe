#!/usr/bin/env bash
# Metadata-cluster benchmarks (see tests/src/bin/cluster_bench.rs): commits/s of a 3-node vs
# a 1-node cluster, cached vs uncached edge lookups, RSS and snapshot size per million
# records. Real release processes on loopback and SeaweedFS; bounded (a few minutes).
#   BENCH_SECS=10 BENCH_RECORDS=200000 scripts/bench-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
install_seaweedfs
cargo build --release -q -p mxcas -p mxcas-tests --bins
TARGET="${CARGO_TARGET_DIR:-$PWD/target}/release"
MXCAS_BIN="$TARGET/mxcas" "$TARGET/cluster_bench"
