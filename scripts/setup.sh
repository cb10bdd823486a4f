#!/usr/bin/env bash
# Create .venv and install voxgrid with everything it needs (CPU torch first: a bare torch
# requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
# scripts/install.sh is the install path the Docker images and offline sites use too.
VOXGRID_EDITABLE=1 bash scripts/install.sh .venv test
# A real Orthanc (+ DICOMweb plugin) for the PACS tests; they start their own on free ports. tinyproxy
# (an HTTP forward proxy) and nftables (a firewall) for the network-namespace lab (tests/netns.py): it
# runs its own proxies and firewalls inside its namespaces. The packages' own services must not run
# (orthanc would hold 4242/8042, tinyproxy 8888): policy-rc.d 101 stops apt starting them. Debian's chromium and
# chromium-driver for the owner console's browser test (tests/test_console.py drives them with Selenium, headless).
if command -v apt-get >/dev/null && ! dpkg -s orthanc orthanc-dicomweb tinyproxy nftables chromium chromium-driver \
        >/dev/null 2>&1; then
    added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ] && [ -w /usr/sbin ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && added_policy=1
    fi
    apt-get update -qq || echo "apt-get update failed"
    apt-get install -y -qq orthanc orthanc-dicomweb || echo "orthanc install failed"
    apt-get install -y -qq tinyproxy nftables || echo "tinyproxy/nftables install failed"
    apt-get install -y -qq chromium chromium-driver || echo "chromium install failed"
    if [ "$added_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
# buildah and debootstrap: tests/test_docker_build.py builds the grid image from docker/grid.Dockerfile on a
# debootstrap base (docker/build-check.sh); no Docker engine or image registry is needed.
if command -v apt-get >/dev/null && ! dpkg -s buildah debootstrap >/dev/null 2>&1; then
    apt-get update -qq || echo "apt-get update failed"
    apt-get install -y -qq buildah debootstrap || echo "buildah/debootstrap install failed"
fi
if command -v Orthanc >/dev/null; then
    { service orthanc stop || true; update-rc.d orthanc disable || true; } >/dev/null 2>&1
fi
if command -v tinyproxy >/dev/null; then
    { service tinyproxy stop || true; update-rc.d tinyproxy disable || true; } >/dev/null 2>&1
fi
.venv/bin/python -c "import voxgrid, voxgrid.nodes, voxgrid.datasets, voxgrid.privacy, torch, monai; print('voxgrid', voxgrid.__version__, 'torch', torch.__version__, 'monai', monai.__version__)"
