#!/usr/bin/env bash
# Create .venv and install voxgrid with everything it needs (CPU torch first: a bare torch
# requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=23.2" "setuptools>=68"
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import voxgrid, voxgrid.nodes, voxgrid.datasets, voxgrid.privacy, torch, monai; print('voxgrid', voxgrid.__version__, 'torch', torch.__version__, 'monai', monai.__version__)"
