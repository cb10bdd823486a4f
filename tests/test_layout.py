"""The distribution's layout: one import namespace, and the house rules on who imports whom."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["voxgrid", "voxgrid.strategies", "voxgrid.nodes", "voxgrid.nodes.service", "voxgrid.nodes.worker",
               "voxgrid.nodes.http", "voxgrid.nodes.ops", "voxgrid.nodes.local", "voxgrid.datasets", "voxgrid.privacy",
               "voxgrid.privacy.secagg"]
HTTP = ("fastapi", "starlette", "uvicorn", "voxgrid.nodes.http")


def _imports(folder: Path) -> set[str]:
    found = set()
    for py in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return found


def test_scientist_side_never_imports_nodes():
    bad = {m for m in _imports(ROOT / "voxgrid") if m.startswith("voxgrid.nodes")}
    assert not bad, f"voxgrid/ imports the node side: {bad}"


def _uses(folder: Path, prefixes) -> set[str]:
    return {m for m in _imports(folder) if any(m == p or m.startswith(p + ".") for p in prefixes)}


def test_service_layer_knows_no_http():
    # Role checks and behaviour live here, so every transport (direct HTTPS, the relay) reaches the same code.
    bad = _uses(ROOT / "nodes" / "service", HTTP)
    assert not bad, f"nodes/service/ imports the HTTP layer: {bad}"


def test_worker_knows_no_http_and_no_service_routes():
    bad = _uses(ROOT / "nodes" / "worker", HTTP + ("voxgrid.nodes.ops", "voxgrid.nodes.local"))
    assert not bad, f"nodes/worker/ imports {bad}"


def test_nodes_has_only_its_sub_packages_at_the_top():
    top = sorted(p.name for p in (ROOT / "nodes").glob("*.py"))
    assert top == ["__init__.py"], f"modules belong in a sub-package of nodes/: {top}"


@pytest.mark.parametrize("folder", ["datasets", "privacy"])
def test_leaf_packages_import_nothing_else_of_voxgrid(folder):
    bad = {m for m in _imports(ROOT / folder) if m.startswith("voxgrid") and not m.startswith(f"voxgrid.{folder}")}
    assert not bad, f"{folder}/ imports {bad}"


def test_no_pickle_or_eval_in_the_code():
    for folder in ("voxgrid", "nodes", "datasets", "privacy"):
        for py in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(py.read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), py
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    assert node.func.id not in ("eval", "exec"), f"{py}: {node.func.id}()"
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                    if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                        kws = {k.arg: k.value for k in node.keywords}
                        assert "weights_only" in kws and getattr(kws["weights_only"], "value", None) is True, py


def test_every_subpackage_imports_from_the_installed_copy(tmp_path):
    # Run from an unrelated folder so the source tree is not on sys.path by accident.
    code = "import importlib; [print(importlib.import_module(m).__name__) for m in %r]" % SUBPACKAGES
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == SUBPACKAGES
    for m in SUBPACKAGES:
        assert importlib.import_module(m).__file__


def test_no_top_level_datasets_package_shadows_others():
    import voxgrid.datasets

    assert voxgrid.datasets.__name__ == "voxgrid.datasets"
    spec = importlib.util.find_spec("datasets")
    assert spec is None or "voxgrid" not in str(spec.origin or "")


def test_a_built_copy_maps_every_folder_into_the_namespace(tmp_path):
    """A regular (non-editable) install of the project: each subpackage comes from the built copy."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    code = "import importlib; [print(importlib.import_module(m).__file__) for m in %r]" % SUBPACKAGES
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    files = out.stdout.split()
    assert len(files) == len(SUBPACKAGES) and all(f.startswith(str(target)) for f in files), files
    assert (target / "voxgrid" / "nodes" / "service" / "node.py").is_file()
    assert not (target / "nodes").exists() and not (target / "datasets").exists()
