"""A node's data roots: volumes whose resolved path escapes them (symlinks, ``..``) are refused, naming the
file and the roots, before anything is registered; a swapped symlink is refused again at load time."""

import json
import shutil

import pytest

from voxgrid.datasets import SiteSpec, VolumeError, load_volume, write_site
from voxgrid.datasets.folder import DataRoots, VolumeSource
from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home, HomeError
from voxgrid.nodes.service.store import NodeStore
from voxgrid.cli import main
from voxgrid.pki import create_ca, issue_certificate

LABELS = {1: "pancreas"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = create_ca(root / "ca")
    return ca, issue_certificate(ca, root / "certs", "n", ["127.0.0.1"])


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Two small NIfTI sites and one DICOM site, written once; tests copy what they change."""
    root = tmp_path_factory.mktemp("sites")
    write_site(SiteSpec(name="s", n_volumes=3, labels=LABELS, shape=(16, 16, 12)), root / "nifti")
    write_site(SiteSpec(name="d", n_volumes=3, labels=LABELS, shape=(16, 16, 8)), root / "dicom", fmt="dicom")
    return root


@pytest.fixture
def node(tmp_path, pki, sites):
    """A node whose only data root is tmp/data (holding a copy of the sites), and a folder outside it."""
    ca, cert = pki
    data, outside = tmp_path / "data", tmp_path / "outside"
    shutil.copytree(sites, data)
    outside.mkdir()
    admin.init_home("node", tmp_path / "home", "n", ca_cert=ca.cert, cert=cert.cert, key=cert.key,
                    data_roots=[data])
    return {"home": tmp_path / "home", "data": data, "outside": outside}


def _add(node, name, images, labels, **kw):
    return admin.add_dataset(node["home"], name, images, labels, policy="open", tags=["ct"], label_names=LABELS,
                             splits=(0.34, 0.33, 0.33), **kw)


def _registry(home):
    store = NodeStore(Home(home).db_file)
    try:
        return {d.name: [(v.case_id, v.image, v.label) for v in d.volumes] for d in store.datasets()}
    finally:
        store.close()


def test_dataset_inside_the_root_registers(node):
    out = _add(node, "inside", node["data"] / "nifti" / "images", node["data"] / "nifti" / "labels")
    assert out["volumes"] == 3
    dicom = _add(node, "inside-dcm", node["data"] / "dicom" / "images", node["data"] / "dicom" / "labels")
    assert dicom["volumes"] == 3
    assert all(str(node["data"].resolve()) in v[1] for v in _registry(node["home"])["inside"])
    assert json.loads(Home(node["home"]).config_file.read_text())["data_roots"] == [str(node["data"].resolve())]


def test_dotdot_path_escaping_the_root_is_refused_and_registry_kept(node):
    _add(node, "inside", node["data"] / "nifti" / "images", node["data"] / "nifti" / "labels")
    before = _registry(node["home"])
    shutil.copytree(node["data"] / "nifti", node["outside"] / "nifti")
    sneaky = node["data"] / ".." / "outside" / "nifti"  # spelled under the root, resolves outside it
    with pytest.raises(VolumeError) as err:
        _add(node, "inside", sneaky / "images", sneaky / "labels", replace=True)
    msg = str(err.value)
    assert "image folder" in msg and str(sneaky / "images") in msg and "outside the node's data roots" in msg
    assert str(node["data"].resolve()) in msg  # names the root
    assert _registry(node["home"]) == before  # the replace did not happen: nothing lost


def test_symlink_pointing_outside_the_root_is_refused_naming_the_file(node):
    _add(node, "keep", node["data"] / "nifti" / "images", node["data"] / "nifti" / "labels")
    before = _registry(node["home"])
    images = node["data"] / "nifti" / "images"
    victim = images / "s-001.nii.gz"
    shutil.move(victim, node["outside"] / "s-001.nii.gz")
    victim.symlink_to(node["outside"] / "s-001.nii.gz")
    with pytest.raises(VolumeError) as err:
        _add(node, "new", images, node["data"] / "nifti" / "labels")
    msg = str(err.value)
    assert "case 's-001' image" in msg and str(victim) in msg
    assert f"resolves to {(node['outside'] / 's-001.nii.gz').resolve()}" in msg
    assert _registry(node["home"]) == before and "new" not in _registry(node["home"])


def test_symlink_inside_a_dicom_series_folder_is_refused(node):
    case = node["data"] / "dicom" / "images" / "d-002"
    first = min(case.glob("*.dcm"))
    shutil.move(first, node["outside"] / first.name)
    first.symlink_to(node["outside"] / first.name)
    with pytest.raises(VolumeError, match=r"case 'd-002' image: file .*outside the node's data roots"):
        _add(node, "dcm", node["data"] / "dicom" / "images", node["data"] / "dicom" / "labels")
    assert _registry(node["home"]) == {}


def test_label_escaping_the_root_is_refused(node):
    labels = node["data"] / "nifti" / "labels"
    shutil.copytree(labels, node["outside"] / "labels")
    with pytest.raises(VolumeError, match="label folder"):
        _add(node, "x", node["data"] / "nifti" / "images", node["outside"] / "labels")


def test_the_node_cache_is_always_allowed(node):
    """PACS pulls land in HOME/cache/pacs/: inside the allowed roots whatever the data roots are."""
    home = Home(node["home"])
    series = home.cache / "pacs" / "ct" / "series-0"
    shutil.copytree(node["data"] / "dicom" / "images" / "d-000", series)
    roots = home.data_roots(home.load())
    roots.check_source(VolumeSource("series-0", series, node["data"] / "dicom" / "labels" / "d-000.nii.gz", "dicom"))
    with pytest.raises(VolumeError, match="label map"):
        roots.check_source(VolumeSource("series-0", series, node["outside"] / "d-000.nii.gz", "dicom"))


def test_swapped_symlink_is_refused_at_load_time(tmp_path, sites):
    """What the worker does before reading a registered volume: the roots are checked again."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(sites / "nifti", data)
    link = data / "link.nii.gz"
    link.symlink_to(data / "images" / "s-000.nii.gz")
    source = VolumeSource("s-000", link, data / "labels" / "s-000.nii.gz", "nifti")
    roots = DataRoots([data])
    roots.check_source(source)  # inside: accepted
    assert load_volume(source).image.shape == (16, 16, 12)
    shutil.copy(data / "images" / "s-000.nii.gz", outside / "other.nii.gz")
    link.unlink()
    link.symlink_to(outside / "other.nii.gz")  # swapped after registration
    with pytest.raises(VolumeError, match="case 's-000' image .*link.nii.gz .*outside the node's data roots"):
        roots.check_source(source)
    DataRoots([]).check_source(source)  # no roots: no restriction


def test_without_data_roots_nothing_is_restricted(tmp_path, pki, sites):
    ca, cert = pki
    admin.init_home("node", tmp_path / "home", "n", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    assert admin.add_dataset(tmp_path / "home", "any", sites / "nifti" / "images", sites / "nifti" / "labels",
                             policy="open", tags=["ct"], label_names=LABELS, check=False)["volumes"] == 3


def test_a_data_root_must_exist(tmp_path, pki):
    ca, cert = pki
    with pytest.raises(HomeError, match="data root .*nowhere does not exist"):
        admin.init_home("node", tmp_path / "home", "n", ca_cert=ca.cert, cert=cert.cert, key=cert.key,
                        data_roots=[tmp_path / "nowhere"])
    assert not (tmp_path / "home" / "node.json").exists()


def _vx(capsys, *args):
    """The ``voxgrid`` command in-process (as its entry point runs it): (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_data_root_flag_and_config_set(tmp_path, pki, sites, capsys):
    ca, cert = pki
    home, data, other = tmp_path / "home", tmp_path / "data", tmp_path / "other"
    shutil.copytree(sites / "nifti", data)
    shutil.copytree(sites / "nifti", other)
    code, _, err = _vx(capsys, "node", "init", "--home", home, "--name", "n", "--ca", ca.cert, "--cert", cert.cert,
                       "--key", cert.key, "--data-root", data)
    assert code == 0, err
    add = ("node", "dataset", "add", "--home", home, "--tags", "ct", "--label-names", "1=pancreas")
    code, _, err = _vx(capsys, *add, "--name", "out", "--images", other / "images", "--labels", other / "labels")
    assert code == 2 and "outside the node's data roots" in err and str(other / "images") in err
    code, _, err = _vx(capsys, *add, "--name", "in", "--images", data / "images", "--labels", data / "labels")
    assert code == 0, err
    code, out, err = _vx(capsys, "node", "config", "set", "--home", home, "--data-root", data, "--data-root", other)
    assert code == 0, err
    assert json.loads(out)["data_roots"] == sorted([str(data.resolve()), str(other.resolve())])
    code, _, err = _vx(capsys, *add, "--name", "out", "--images", other / "images", "--labels", other / "labels")
    assert code == 0, err
    code, _, err = _vx(capsys, "node", "config", "set", "--home", home)
    assert code == 2 and "--data-root PATH" in err


def test_the_worker_refuses_a_symlink_swapped_after_registration(node):
    """The executor's prepare() re-checks the roots the service hands it, before the disk or the cache."""
    import voxgrid
    from voxgrid.nodes.worker.prepcache import PrepCache
    from voxgrid.nodes.worker.training import prepare

    _add(node, "ct", node["data"] / "nifti" / "images", node["data"] / "nifti" / "labels")
    store = NodeStore(Home(node["home"]).db_file)
    ds = store.dataset("ct")
    store.close()
    home = Home(node["home"])
    roots = [str(r) for r in home.data_roots(home.load()).roots]
    plan = voxgrid.unet_plan(["background", "pancreas"])
    volumes = [v.__dict__ for v in ds.volumes]
    cache = PrepCache(node["home"] / "cache" / "prepared")
    assert len(prepare(volumes, ds.label_names, plan, cache=cache, roots=roots).splits["train"]) >= 1
    image = node["data"] / "nifti" / "images" / "s-000.nii.gz"
    shutil.move(image, node["outside"] / "s-000.nii.gz")
    image.symlink_to(node["outside"] / "s-000.nii.gz")  # same bytes, now off the data root
    with pytest.raises(VolumeError, match="case 's-000' image .*outside the node's data roots"):
        prepare(volumes, ds.label_names, plan, cache=cache, roots=roots)
    assert len(prepare(volumes, ds.label_names, plan, cache=cache).splits["train"]) >= 1  # no roots: as before


@pytest.mark.slow
def test_a_job_on_a_swapped_symlink_fails_without_naming_the_path(node):
    """Through the real executor process: the job fails, the reason stays in the node's log."""
    import time

    from voxgrid import tensors, unet_plan
    from voxgrid.nodes.service.node import Caller, NodeService
    from voxgrid.plan import initial_weights
    from voxgrid.wire import JobRequest

    _add(node, "ct", node["data"] / "nifti" / "images", node["data"] / "nifti" / "labels")
    image = node["data"] / "nifti" / "images" / "s-000.nii.gz"
    shutil.move(image, node["outside"] / image.name)
    image.symlink_to(node["outside"] / image.name)
    service = NodeService(Home(node["home"]))
    try:
        alice = Caller("alice", "scientist")
        plan = unet_plan(["background", "pancreas"], channels=(4, 8), strides=(2,), num_res_units=0)
        ref = service.put_weights(alice, tensors.dumps(initial_weights(plan)))
        job = service.submit(alice, JobRequest(experiment_id="e", round=0, dataset="ct", weights_id=ref.weights_id,
                                               plan=plan.model_dump(mode="json"), plan_hash=plan.content_hash))
        deadline = time.monotonic() + 120
        while (st := service.job_status(alice, job.job_id)).state in ("queued", "running"):
            assert time.monotonic() < deadline, "job did not finish"
            time.sleep(0.2)
        assert st.state == "failed" and "could not be loaded" in st.error
        assert str(node["outside"]) not in st.error and "/" not in st.error
    finally:
        service.close()
