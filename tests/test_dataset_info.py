"""A dataset's published allowlist carries shape and spacing ranges, computed at registration, stored in
the registry (old stores keep working), and shown compactly in the scientist's pointer table."""

import json
import sqlite3

import numpy as np
import pytest

from voxgrid.datasets import SiteSpec, write_site
from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.store import NodeStore
from voxgrid.pki import create_ca, issue_certificate
from voxgrid.pointers import DatasetPointer, PointerList
from voxgrid.wire import DatasetInfo

LABELS = {1: "pancreas"}
# Two scanners in one folder: the ranges span both.
SMALL = SiteSpec(name="a", n_volumes=2, labels=LABELS, shape=(16, 16, 12), spacing=(1.5, 1.5, 2.0))
LARGE = SiteSpec(name="b", n_volumes=1, labels=LABELS, shape=(20, 18, 10), spacing=(0.8, 0.75, 3.0))
SHAPES = [[16, 16, 10], [20, 18, 12]]
SPACINGS = [[0.8, 0.75, 2.0], [1.5, 1.5, 3.0]]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    ca = create_ca(root / "ca")
    cert = issue_certificate(ca, root / "certs", "n", ["127.0.0.1"])
    admin.init_home("node", root / "home", "n", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    for fmt in ("nifti", "dicom"):
        for spec in (SMALL, LARGE):
            write_site(spec, root / fmt, fmt=fmt)
    return root


def _info(home, name) -> DatasetInfo:
    store = NodeStore(Home(home).db_file)
    try:
        return store.dataset(name).info()
    finally:
        store.close()


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
@pytest.mark.parametrize("check", [True, False])  # volumes read once, or headers only
def test_ranges_are_published_from_nifti_and_dicom(node, fmt, check):
    name = f"{fmt}-{check}"
    admin.add_dataset(node / "home", name, node / fmt / "images", node / fmt / "labels", policy="open", tags=["ct"],
                      label_names=LABELS, splits=(0.34, 0.33, 0.33), check=check)
    info = _info(node / "home", name)
    wire = json.loads(info.model_dump_json())
    assert wire["shape_range"] == SHAPES
    np.testing.assert_allclose(wire["spacing_range"], SPACINGS, atol=1e-3)
    assert DatasetInfo.model_validate_json(info.model_dump_json()) == info  # round-trips through the wire


def test_the_allowlist_holds_nothing_else(node):
    assert set(DatasetInfo.model_fields) == {"name", "description", "tags", "modality", "volumes", "label_names",
                                             "splits", "shape_range", "spacing_range"}
    admin.add_dataset(node / "home", "phi", node / "dicom" / "images", node / "dicom" / "labels", policy="open", tags=["ct"],
                      label_names=LABELS, splits=(0.34, 0.33, 0.33))
    wire = json.loads(_info(node / "home", "phi").model_dump_json())
    for key in ("shape_range", "spacing_range"):  # two triples of plain numbers, no names, paths or tags
        assert len(wire[key]) == 2 and all(len(t) == 3 and all(isinstance(x, (int, float)) for x in t)
                                           for t in wire[key])
    text = json.dumps(wire)
    for secret in ("PHANTOM", "PH-A", "Hospital", "ACC", str(node), "a-000", "series-"):
        assert secret not in text
    with pytest.raises(ValueError):  # a malformed range is refused, not published
        DatasetInfo(name="x", tags=["#ct"], volumes=1, label_names=["background"], splits={},
                    shape_range=[[1, 2], [3, 4]])


def test_a_store_from_before_the_ranges_still_works(tmp_path):
    db = tmp_path / "node.db"
    with sqlite3.connect(db) as c:  # the datasets table as the first release created it
        c.execute("CREATE TABLE datasets (name TEXT PRIMARY KEY, description TEXT NOT NULL, tags TEXT NOT NULL, "
                  "modality TEXT NOT NULL, label_names TEXT NOT NULL, created_at TEXT NOT NULL)")
        c.execute("INSERT INTO datasets VALUES ('old', '', '[\"#ct\"]', 'CT', '{\"1\": \"pancreas\"}', 'then')")
    store = NodeStore(db)
    try:
        info = store.dataset("old").info()
        assert info.shape_range is None and info.spacing_range is None and info.label_names[1] == "pancreas"
        store.add_dataset("new", description="", policy="open", tags=["#ct"], modality="CT", label_names=LABELS, volumes=[],
                          shape_range=((1, 2, 3), (4, 5, 6)), spacing_range=((1.0, 1.0, 2.5), (1.0, 1.0, 5.0)))
        assert store.dataset("new").info().shape_range == ((1, 2, 3), (4, 5, 6))
    finally:
        store.close()


def test_pointer_table_shows_the_ranges_compactly():
    info = DatasetInfo(name="ct", tags=["#ct"], volumes=3, label_names=["background", "pancreas"],
                       splits={"train": 2, "val": 1, "test": 0},
                       shape_range=((512, 512, 80), (512, 512, 120)), spacing_range=((0.7, 0.7, 2.5), (0.9, 0.9, 2.5)))
    old = info.model_copy(update={"name": "old", "shape_range": None, "spacing_range": None})
    ptrs = PointerList(DatasetPointer("node-a", "https://a", i, None) for i in (info, old))
    row = ptrs[0].row()
    assert row["shape"] == "512x512x80-120" and row["spacing (mm)"] == "0.7-0.9x0.7-0.9x2.5"
    assert ptrs[1].row()["shape"] == "" and ptrs[1].row()["spacing (mm)"] == ""
    text = repr(ptrs)
    assert "512x512x80-120" in text and "spacing (mm)" in text.splitlines()[0]
    assert "<td>0.7-0.9x0.7-0.9x2.5</td>" in ptrs._repr_html_()
