#!/usr/bin/env bash
# Installs the package into .venv and runs the quickstart on the embedded default (no servers needed).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
exec "$VENV/bin/python" examples/quickstart.py
