#!/usr/bin/env bash
# mxcas benchmarks, each against a baseline measured in the same run, reported as ratios:
#
#  1. upload throughput of a 1 GiB file vs `openssl dgst -sha256` of the same file (an upload
#     must at least hash every byte) and vs `dd conv=fsync` of it into the same filesystem (an
#     acknowledged upload must at least be durably written), and the server's peak RSS;
#  2. hot 100 KiB GET requests/s vs nginx serving the same file, same load generator (wrk).
#
# Installs wrk and nginx from Debian if missing. Uses ports 127.0.0.1:18xxx; stops everything
# it starts. Takes about two minutes. Usage: scripts/bench.sh [SIZE_MIB (default 1024)]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB="${1:-1024}"
DURATION="${BENCH_DURATION:-10s}"
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v bc >/dev/null; then
  echo "==> installing wrk and nginx (apt)"
  apt-get update -qq && apt-get install -y -qq wrk nginx bc >/dev/null
fi
echo "==> building release binary"
cargo build --release -q -p mxcas
BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/mxcas"

WORK="$(mktemp -d /tmp/mxcas-bench.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

echo "==> ${SIZE_MIB} MiB of random data"
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom > "$WORK/big"
head -c 102400 /dev/urandom > "$WORK/small"
cat "$WORK/big" > /dev/null   # page cache: both sides read from memory

best() { sort -n | head -n1; }
secs() {
  local s e; s=$(date +%s.%N)
  "$@" >/dev/null || { echo "benchmark step failed: $*" >&2; return 1; }
  e=$(date +%s.%N); echo "$e - $s" | bc -l
}

echo "==> baseline: openssl dgst -sha256 (best of 3)"
OPENSSL_S=$(for _ in 1 2 3; do secs openssl dgst -sha256 "$WORK/big"; done | best)

echo "==> baseline: dd conv=fsync into the data filesystem (best of 3)"
DD_S=$(for _ in 1 2 3; do secs dd if="$WORK/big" of="$WORK/ddcopy" bs=8M conv=fsync status=none; rm -f "$WORK/ddcopy"; done | best)

cat > "$WORK/mxcas.toml" <<TOML
listen = "127.0.0.1:18008"
admin_listen = "127.0.0.1:18009"
data_dir = "$WORK/data"
[auth]
tokens = { "bench-token-123456" = "@bench:localhost" }
[media]
max_upload_size = "$((SIZE_MIB + 1)) MiB"
# One benchmark user makes every request: no per-user rate limits.
uploads_per_minute_per_user = 0
downloads_per_minute_per_user = 0
TOML
"$BIN" serve --config "$WORK/mxcas.toml" > "$WORK/mxcas.log" 2>&1 &
MXCAS_PID=$!; PIDS+=("$MXCAS_PID")
for _ in $(seq 100); do curl -sf http://127.0.0.1:18009/readyz >/dev/null && break; sleep 0.1; done

echo "==> mxcas: upload of ${SIZE_MIB} MiB (best of 3; each a fresh file so nothing is deduplicated)"
UPLOAD_S=999999
for i in 1 2 3; do
  # A different first byte each time gives a different CID, so each upload is stored in full.
  printf '%d' "$i" | dd of="$WORK/big" bs=1 count=1 conv=notrunc status=none
  # -T streams the file (--data-binary would read it all into curl's memory first).
  t=$(secs curl -sf -X POST -H 'Authorization: Bearer bench-token-123456' -H 'Content-Type: application/octet-stream' \
        -T "$WORK/big" http://127.0.0.1:18008/_matrix/media/v3/upload)
  UPLOAD_S=$(printf '%s\n%s\n' "$UPLOAD_S" "$t" | best)
done
RSS_KIB=$(awk '/VmHWM/ {print $2}' "/proc/$MXCAS_PID/status")

echo "==> hot GET of a 100 KiB file: mxcas vs nginx, wrk -t2 -c64 -d$DURATION"
URI=$(curl -sf -H 'Authorization: Bearer bench-token-123456' --data-binary @"$WORK/small" \
        http://127.0.0.1:18008/_matrix/media/v3/upload | sed 's/.*mxc:\/\/localhost\/\([^"]*\)".*/\1/')
MXCAS_URL="http://127.0.0.1:18008/_matrix/client/v1/media/download/localhost/$URI"
curl -sf -H 'Authorization: Bearer bench-token-123456' "$MXCAS_URL" | cmp - "$WORK/small"
mkdir -p "$WORK/www"; cp "$WORK/small" "$WORK/www/small"
# nginx started as root serves as `nobody`: mktemp's 0700 directory would answer 403 to
# every request (very fast, and wrong). Make the served tree readable, and check below that
# the baseline really answers 200 with the file's bytes before timing it.
chmod a+rx "$WORK" "$WORK/www"; chmod a+r "$WORK/www/small"
cat > "$WORK/nginx.conf" <<NGINX
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  server { listen 127.0.0.1:18080; root $WORK/www; }
}
NGINX
nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
PIDS+=("$!")
for _ in $(seq 50); do curl -sf http://127.0.0.1:18080/small >/dev/null && break; sleep 0.1; done
if ! curl -sf http://127.0.0.1:18080/small | cmp -s - "$WORK/small"; then
  echo "error: the nginx baseline does not serve the file (status $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18080/small)); see $WORK/nginx.err" >&2
  exit 1
fi
# wrk counts every answer; a run with non-2xx answers is not a measurement.
rps() {
  local out; out=$(wrk -t2 -c64 -d"$DURATION" "$@")
  if echo "$out" | grep -q 'Non-2xx'; then echo "error: wrk saw non-2xx answers from $*:" >&2; echo "$out" >&2; exit 1; fi
  echo "$out" | awk '/Requests\/sec/ {print $2}'
}
MXCAS_RPS=$(rps -H 'Authorization: Bearer bench-token-123456' "$MXCAS_URL")
NGINX_RPS=$(rps http://127.0.0.1:18080/small)

MIB_S() { echo "$SIZE_MIB / $1" | bc -l; }
printf '\n%-46s %12s %12s %8s\n' "benchmark" "mxcas" "baseline" "ratio"
printf '%-46s %12.0f %12.0f %8.2f\n' "upload ${SIZE_MIB} MiB, MiB/s (vs openssl sha256)" \
  "$(MIB_S "$UPLOAD_S")" "$(MIB_S "$OPENSSL_S")" "$(echo "$OPENSSL_S / $UPLOAD_S" | bc -l)"
printf '%-46s %12.0f %12.0f %8.2f\n' "upload ${SIZE_MIB} MiB, MiB/s (vs dd conv=fsync)" \
  "$(MIB_S "$UPLOAD_S")" "$(MIB_S "$DD_S")" "$(echo "$DD_S / $UPLOAD_S" | bc -l)"
printf '%-46s %12.0f %12s %8s\n' "peak RSS of mxcas during uploads, MiB" "$(echo "$RSS_KIB / 1024" | bc -l)" "-" "-"
printf '%-46s %12.0f %12.0f %8.2f\n' "hot 100 KiB GET, req/s (vs nginx)" "$MXCAS_RPS" "$NGINX_RPS" \
  "$(echo "$MXCAS_RPS / $NGINX_RPS" | bc -l)"
