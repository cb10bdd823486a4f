#!/usr/bin/env bash
# Set up, then run the whole federation demo on this machine (extra arguments go to `voxgrid demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/voxgrid demo --out demo-out "$@"
