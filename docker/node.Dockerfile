# A site's data node. The executor trains on the GPU when the container sees one (docker compose -f
# compose.yaml -f compose.gpu.yaml, or docker run --gpus all) and on the CPU otherwise (the node's device
# is "auto"). Build from the repository root:
#   docker build -f docker/node.Dockerfile -t voxgrid-node .
# No CUDA base image: torch's Linux wheels bring the CUDA runtime libraries they load (docker/README.md,
# "The node image's base": a CUDA base only adds a second, unused set). BASE: any Debian-like image with
# python3 (3.11+) and its venv module; docker/build-check.sh passes a Debian bookworm made with debootstrap.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PATH=/opt/voxgrid/bin:$PATH VOXGRID_HOME=/srv/voxgrid
RUN groupadd --system --gid 10001 voxgrid \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /srv/voxgrid voxgrid \
 && mkdir -p /data && chown voxgrid:voxgrid /data

WORKDIR /opt/voxgrid-src
# Dependencies first, from pyproject.toml alone: a change to the source (or the README) reuses this layer.
# torch==2.13.0 from the package index is its CUDA build on Linux x86_64, with its CUDA libraries.
COPY pyproject.toml ./
COPY scripts/install.sh scripts/install.sh
ARG VOXGRID_TORCH=torch==2.13.0
RUN VOXGRID_DEPS_ONLY=1 VOXGRID_TORCH="${VOXGRID_TORCH}" bash scripts/install.sh /opt/voxgrid
COPY README.md ./
COPY voxgrid voxgrid
COPY nodes nodes
COPY datasets datasets
COPY privacy privacy
# The same install script CI runs (through scripts/setup.sh).
RUN VOXGRID_TORCH="${VOXGRID_TORCH}" bash scripts/install.sh /opt/voxgrid

USER 10001:10001
WORKDIR /srv/voxgrid
VOLUME ["/srv/voxgrid"]
EXPOSE 8443
# The site's startup kit ('voxgrid provision') is mounted read-only at /kit: its start.sh creates
# the node home in /srv/voxgrid on first start, then serves. SIGTERM stops the node cleanly.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
  CMD ["voxgrid", "node", "status", "--home", "/srv/voxgrid"]
CMD ["/kit/start.sh"]
