# A site's data node: CUDA runtime base; the executor trains on the GPU when the container sees one
# (docker compose -f compose.yaml -f compose.gpu.yaml, or docker run --gpus all) and on the CPU otherwise
# (the node's device is "auto"). Build from the repository root:
#   docker build -f docker/node.Dockerfile -t voxgrid-node .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PATH=/opt/voxgrid/bin:$PATH VOXGRID_HOME=/srv/voxgrid
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 voxgrid \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /srv/voxgrid voxgrid \
 && mkdir -p /data && chown voxgrid:voxgrid /data

WORKDIR /opt/voxgrid-src
COPY pyproject.toml README.md ./
COPY voxgrid voxgrid
COPY nodes nodes
COPY datasets datasets
COPY privacy privacy
COPY scripts/install.sh scripts/install.sh
# The same install script CI runs (through scripts/setup.sh). torch==2.13.0 from the package index
# is its CUDA build on Linux x86_64; CUDA_IMAGE provides the runtime libraries it needs.
ARG VOXGRID_TORCH=torch==2.13.0
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
