# The grid directory (no GPU needed). Build from the repository root:
#   docker build -f docker/grid.Dockerfile -t voxgrid-grid .
# VOXGRID_TORCH_INDEX may name PyTorch's CPU wheel index for a smaller image (voxgrid imports torch).
# BASE: any Debian-like image with python3 (3.10+) and its venv module; docker/build-check.sh passes a
# Debian bookworm made with debootstrap, for machines with no image registry.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PATH=/opt/voxgrid/bin:$PATH VOXGRID_HOME=/srv/voxgrid
RUN groupadd --system --gid 10001 voxgrid \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /srv/voxgrid voxgrid

WORKDIR /opt/voxgrid-src
# Dependencies first, from pyproject.toml alone: a change to the source (or the README) reuses this layer.
COPY pyproject.toml ./
COPY scripts/install.sh scripts/install.sh
ARG VOXGRID_TORCH=torch==2.13.0
ARG VOXGRID_TORCH_INDEX=
RUN VOXGRID_DEPS_ONLY=1 VOXGRID_TORCH="${VOXGRID_TORCH}" VOXGRID_TORCH_INDEX="${VOXGRID_TORCH_INDEX}" \
    bash scripts/install.sh /opt/voxgrid
COPY README.md ./
COPY voxgrid voxgrid
COPY nodes nodes
COPY datasets datasets
COPY privacy privacy
RUN VOXGRID_TORCH="${VOXGRID_TORCH}" VOXGRID_TORCH_INDEX="${VOXGRID_TORCH_INDEX}" \
    bash scripts/install.sh /opt/voxgrid

USER 10001:10001
WORKDIR /srv/voxgrid
VOLUME ["/srv/voxgrid"]
EXPOSE 8443
# The grid's startup kit ('voxgrid provision') is mounted read-only at /kit: its start.sh creates
# the grid home on first start, authorises the provisioned node tokens, then serves.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
  CMD ["voxgrid", "grid", "status", "--home", "/srv/voxgrid"]
CMD ["/kit/start.sh"]
