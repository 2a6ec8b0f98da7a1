#!/usr/bin/env bash
# Installs everything the tests need (gearmand included) and runs lint, types and the whole test suite.
# Usage: bash scripts/test.sh [pytest args...]    PYTHON=python3.12 VENV=.venv312 bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v gearmand >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing gearmand (Debian package gearman-job-server) for the Gearman tests"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends gearman-job-server >/dev/null
  else
    echo "gearmand is missing: sudo apt-get install -y --no-install-recommends gearman-job-server" >&2
    exit 1
  fi
fi
# CI runs two Pythons at once: installing the package writes into the source tree, so one at a time.
exec 9>"${TMPDIR:-/tmp}/remote_executor-setup.lock"
flock 9
EXTRAS=all,test source scripts/setup.sh
flock -u 9
"$VENV/bin/ruff" check src tests conformance benchmarks examples
"$VENV/bin/mypy"
exec "$VENV/bin/python" -m pytest "$@"
