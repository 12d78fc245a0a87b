#!/usr/bin/env bash
# README command 2: install everything (Debian's relion, .venv with the package and test tools), run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest -q "$@"
