#!/usr/bin/env bash
# Install voxgrid into a virtual environment. The one install path: scripts/setup.sh (CI, the demo),
# the Dockerfiles in docker/ and an offline site (from a wheelhouse) all call it.
#
#   scripts/install.sh VENV [EXTRAS]          e.g. scripts/install.sh .venv test
#
# Environment:
#   PYTHON               the interpreter that creates VENV (default python3)
#   VOXGRID_TORCH        the torch requirement, installed first (default torch==2.13.0: a bare
#                        requirement would pull whatever build the index serves)
#   VOXGRID_TORCH_INDEX  a package index for torch alone (e.g. PyTorch's CPU wheel index)
#   VOXGRID_EDITABLE=1   install the source tree editable (pip install -e), as for development
#   VOXGRID_WHEELHOUSE   install offline from this folder only (--no-index --find-links), voxgrid
#                        itself included (built by 'voxgrid wheelhouse' or 'pip wheel')
#   VOXGRID_DEPS_ONLY=1  install torch and what pyproject.toml lists (with EXTRAS), not voxgrid: the
#                        Dockerfiles' layer below the source, so a source change reuses it (Python 3.11+)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:?usage: scripts/install.sh VENV [EXTRAS]}
EXTRAS=${2:-}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
if [ -n "${VOXGRID_WHEELHOUSE:-}" ]; then
    PIP+=(--no-index --find-links "$VOXGRID_WHEELHOUSE")
    SPEC=voxgrid
else
    "${PIP[@]}" --upgrade "pip>=23.2" "setuptools>=68"
    SPEC=$ROOT
fi
if [ -n "${VOXGRID_TORCH_INDEX:-}" ] && [ -z "${VOXGRID_WHEELHOUSE:-}" ]; then
    "${PIP[@]}" --index-url "$VOXGRID_TORCH_INDEX" "${VOXGRID_TORCH:-torch==2.13.0}"
else
    "${PIP[@]}" "${VOXGRID_TORCH:-torch==2.13.0}"
fi
if [ "${VOXGRID_DEPS_ONLY:-0}" = 1 ]; then
    mapfile -t DEPS < <("$VENV/bin/python" - "$ROOT/pyproject.toml" "$EXTRAS" <<'PY'
import sys
import tomllib  # Python 3.11+: the images' interpreters

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = list(project["dependencies"])
for extra in filter(None, sys.argv[2].split(",")):
    deps += project["optional-dependencies"][extra]
print("\n".join(d for d in deps if not d.startswith("torch")))  # torch: installed above, as chosen
PY
)
    "${PIP[@]}" "${DEPS[@]}"
    exit 0
fi
if [ -n "$EXTRAS" ]; then SPEC="$SPEC[$EXTRAS]"; fi
if [ "${VOXGRID_EDITABLE:-0}" = 1 ]; then "${PIP[@]}" -e "$SPEC"; else "${PIP[@]}" "$SPEC"; fi
"$VENV/bin/python" -I -c "import voxgrid, voxgrid.nodes, voxgrid.datasets, voxgrid.privacy, torch, monai; print('voxgrid', voxgrid.__version__, 'torch', torch.__version__, 'monai', monai.__version__)"
