# The scientist's JupyterLab with voxgrid (the scientist's side) and the notebooks. Build from the
# repository root:  docker build -f docker/jupyter.Dockerfile -t voxgrid-jupyter .
# BASE: any Debian-like image with python3 (3.10+) and its venv module (docker/build-check.sh: debootstrap).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PATH=/opt/voxgrid/bin:$PATH
RUN groupadd --system --gid 10001 scientist \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/scientist scientist

WORKDIR /opt/voxgrid-src
# Dependencies first, from pyproject.toml alone: a change to the source (or the README) reuses this layer.
COPY pyproject.toml ./
COPY scripts/install.sh scripts/install.sh
ARG VOXGRID_TORCH=torch==2.13.0
ARG VOXGRID_TORCH_INDEX=
RUN VOXGRID_DEPS_ONLY=1 VOXGRID_TORCH="${VOXGRID_TORCH}" VOXGRID_TORCH_INDEX="${VOXGRID_TORCH_INDEX}" \
    bash scripts/install.sh /opt/voxgrid notebook
COPY README.md ./
COPY voxgrid voxgrid
COPY nodes nodes
COPY datasets datasets
COPY privacy privacy
RUN VOXGRID_TORCH="${VOXGRID_TORCH}" VOXGRID_TORCH_INDEX="${VOXGRID_TORCH_INDEX}" \
    bash scripts/install.sh /opt/voxgrid notebook
COPY --chown=scientist:scientist notebooks /home/scientist/notebooks

USER 10001:10001
WORKDIR /home/scientist
EXPOSE 8888
# JUPYTER_TOKEN (set it) protects the server; the federation's CA certificate is mounted at
# /home/scientist/ca.crt, the grid's URL is in VOXGRID_GRID.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8888/api', timeout=5)"]
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--ServerApp.root_dir=/home/scientist"]
