#!/usr/bin/env bash
# Set up everything on a fresh Debian machine with Python >= 3.11 and pip: Debian packages, a virtual
# environment in .venv and this package (with the test tools when called with "dev").
# Idempotent: a second call only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
want_dev="${1:-}"
if [ "$want_dev" = "dev" ] && ! command -v relion_reconstruct >/dev/null 2>&1; then
  # RELION 3.1.3 (CPU) is the reference the interoperability tests compare against
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends relion >/dev/null
fi
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if [ "$want_dev" = "dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
