#!/usr/bin/env bash
# Set up everything on a fresh Debian machine with Python >= 3.11 and pip: Debian packages, a virtual
# environment in .venv and this package (with the test tools when called with "dev").
# Idempotent: a second call only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
want_dev="${1:-}"
# dev: RELION 3.1.3 (CPU), the reference the interoperability tests compare against; SLURM (slurmctld, slurmd,
# munge) for tests/test_slurm.py's single-node cluster; Chromium for tests/test_dashboard.py's headless browser
if [ "$want_dev" = "dev" ]; then
  missing=""
  for pair in relion:relion_reconstruct slurmctld:slurmctld slurmd:slurmd slurm-client:squeue munge:munged \
              chromium:chromium; do
    command -v "${pair#*:}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair#*:}" ] || missing="$missing ${pair%%:*}"
  done
  # text in the browser's pages (tests/test_dashboard.py); chromium itself depends on no font
  dpkg -s fonts-dejavu-core >/dev/null 2>&1 || missing="$missing fonts-dejavu-core"
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
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
