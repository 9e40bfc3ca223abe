#!/usr/bin/env bash
# Thumbnail generation time of mxcas against Synapse's own media repository, same requests:
# a 12-megapixel photo-like JPEG and a 60-frame animated GIF, each at the spec's five sizes
# (32x32 and 96x96 crop; 320x240, 640x480, 800x600 scale), first request (generates) and
# second (stored), every answer decoded and checked. See scripts/bench-thumbnails.py.
#
# Starts its own Synapse on loopback (free port, temp dir, stopped on exit). mxcas is measured
# when given a running one; it builds nothing. About a minute with the default 9 copies.
#
#   scripts/bench-thumbnails.sh                                    # Synapse only
#   scripts/bench-thumbnails.sh --mxcas-url http://127.0.0.1:8008 --mxcas-token TOKEN [--mxcas-pid PID]
#   scripts/bench-thumbnails.sh --reps 3 --only jpeg               # quicker
#
# Synapse comes from $SYNAPSE_PYTHON if set, else the pinned venv scripts/test.sh installs in
# $MXCAS_TEST_DEPS (default ~/.cache/mxcas-test-deps), installed here if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SYNAPSE_VERSION=1.163.2
DEPS="${MXCAS_TEST_DEPS:-$HOME/.cache/mxcas-test-deps}"
if [ -z "${SYNAPSE_PYTHON:-}" ]; then
  # Asks the interpreter, not `pip show | grep -q`: grep quitting early makes pip fail on a
  # broken pipe, and under pipefail that looked like "not installed".
  if [ "$("$DEPS/synapse/bin/python" -c 'import synapse; print(synapse.__version__)' 2>/dev/null)" != "$SYNAPSE_VERSION" ]; then
    echo "==> installing Synapse $SYNAPSE_VERSION (PyPI matrix-synapse) in $DEPS/synapse" >&2
    mkdir -p "$DEPS"
    python3 -m venv "$DEPS/synapse"
    "$DEPS/synapse/bin/pip" install --quiet --disable-pip-version-check "matrix-synapse==$SYNAPSE_VERSION"
  fi
  SYNAPSE_PYTHON="$DEPS/synapse/bin/python"
fi
exec "$SYNAPSE_PYTHON" scripts/bench-thumbnails.py "$@"
