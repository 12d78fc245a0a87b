#!/usr/bin/env bash
# README command 1: install, then run the demo job (simulate particles, run the job on a local cluster, write a map).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gerelion demo --o "${1:-demo_out}"
