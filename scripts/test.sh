#!/usr/bin/env bash
# The one test command (README, .ci/run): make a venv, install what the tests
# need (redis-server too, when missing), run the suite. The suite itself starts
# and stops its servers (redis-server, a 3-node Redis Cluster, moto's S3) on
# free loopback ports. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's package" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

.venv/bin/python -m ruff check lmcache_core lmcache_cli tests scripts
.venv/bin/python -m mypy lmcache_core lmcache_cli scripts
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
