"""End to end: real node and grid processes, real TLS, real SQLite, DICOM phantoms on disk."""

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch

import voxgrid
from voxgrid import tensors
from voxgrid.client import NodeClient
from voxgrid.pki import client_ssl_context, create_ca
from voxgrid.plan import initial_weights
from voxgrid.wire import JobRequest

pytestmark = pytest.mark.slow

PHI = ("PHANTOM^", "Voxgrid Phantom Hospital", "ACC0001", "19700101", "site-a-0")  # names, headers, case ids


def plan(**kw):
    return voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), **kw)


def raw(fed, i=0, token=None, ca=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=fed.nodes[i].url + "/v1", verify=client_ssl_context(ca or fed.ca_cert),
                        headers=headers, timeout=30)


def test_requests_without_a_valid_token_are_refused(federation):
    with raw(federation) as c:
        r = c.get("/datasets")
        assert r.status_code == 401 and "missing bearer token" in r.json()["detail"]
        assert r.headers["content-type"].startswith("application/problem+json")
    with raw(federation, token="vxg_" + "x" * 40) as c:
        assert c.get("/health").status_code == 401


def test_plain_http_and_a_foreign_ca_are_refused(federation, tmp_path):
    with pytest.raises(httpx.HTTPError):
        httpx.get(federation.nodes[0].url.replace("https", "http") + "/v1/health", timeout=5)
    other = create_ca(tmp_path / "other-ca")
    with pytest.raises(voxgrid.Unreachable, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        NodeClient(federation.nodes[0].url, federation.scientist_token, other.cert).health()


def test_scientist_cannot_use_owner_endpoints_or_register_nodes(federation):
    c = NodeClient(federation.nodes[0].url, federation.scientist_token, federation.ca_cert)
    assert c.whoami().role == "scientist"
    for call in (c.audit, c.jobs, lambda: c.issue_token("mallory")):
        with pytest.raises(voxgrid.AccessRefused, match="role 'scientist'"):
            call()
    grid = voxgrid.GridClient(federation.grid.url, federation.scientist_token, federation.ca_cert)
    with pytest.raises(voxgrid.AccessRefused, match="role 'scientist'"):
        grid.register(c.info())
    owner = NodeClient(federation.nodes[0].url, federation.owner_token(0), federation.ca_cert)
    assert owner.whoami().role == "owner" and owner.audit()


def test_search_returns_pointers_with_a_table(federation):
    grid = federation.connect()
    ptrs = grid.search("#ct", "#pancreas")
    assert sorted(p.name for p in ptrs) == ["site-a", "site-b", "site-c"]
    assert [p.name for p in grid.search("#tumor")] == ["site-b", "site-c"]
    assert len(grid.search("#mri")) == 0
    text = repr(ptrs)
    assert "node-site-a" in text and "#pancreas" in text and "train" in text
    frame = ptrs.to_frame()
    assert list(frame.columns) == ["node", "dataset", "tags", "volumes", "labels", "splits", "shape", "spacing (mm)"]
    assert frame["shape"].tolist() == ["32x32x32"] * 3  # the published shape range, compactly
    assert "<table>" in ptrs._repr_html_()
    with pytest.raises(voxgrid.RequestRefused, match="malformed tag"):
        grid._grid.search("no spaces allowed")


def test_data_is_never_released(federation):
    grid = federation.connect()
    p = grid.search("#tumor")[0]
    with pytest.raises(voxgrid.AccessRefused, match="never release voxels"):
        p.get()
    for attempt in (lambda: np.asarray(p), lambda: p[0], lambda: list(p), lambda: torch.as_tensor(p)):
        with pytest.raises(PermissionError, match="metadata only"):
            attempt()
    owner = NodeClient(p.url, federation.owner_token(1), federation.ca_cert)
    with pytest.raises(voxgrid.AccessRefused):  # not even the owner, over the wire
        owner.request_data(p.name)
    assert any(e.action == "data.refused" for e in owner.audit())


def test_no_path_or_phi_in_anything_published(federation):
    grid = federation.connect()
    published = [p.info.model_dump_json() for p in grid.search()]
    published += [n.model_dump_json() for n in grid._grid.nodes()]
    for i in range(3):
        c = NodeClient(federation.nodes[i].url, federation.scientist_token, federation.ca_cert)
        published += [c.info().model_dump_json(), json.dumps([d.model_dump() for d in c.datasets()])]
    text = "\n".join(published)
    assert str(federation.root) not in text and "/data/" not in text and ".dcm" not in text
    for phi in PHI:
        assert phi not in text, phi


def _job(p, weights_id, **kw):
    pl = plan()
    fields = dict(kind="train", experiment_id="t-1", round=0, dataset=p.name, plan=pl.model_dump(mode="json"),
                  plan_hash=pl.content_hash, weights_id=weights_id)
    fields.update(kw)
    return JobRequest(**fields)


def test_bad_jobs_are_refused_with_clear_messages(federation):
    p = federation.connect().search("#ct")[0]
    ref = p.client.put_weights(tensors.dumps(initial_weights(plan())))
    bad_plan = plan().model_dump(mode="json") | {"network": {"_target_": "os.system", "command": "id"}}
    with pytest.raises(voxgrid.RequestRefused, match="os.system") as e:
        p.client.submit(_job(p, ref.weights_id, plan=bad_plan))
    assert "network" in str(e.value)
    with pytest.raises(voxgrid.NotFoundError, match="no dataset named 'nope'"):
        p.client.submit(_job(p, ref.weights_id, dataset="nope"))
    with pytest.raises(voxgrid.RequestRefused, match="unknown weights"):
        p.client.submit(_job(p, "0" * 64))
    with pytest.raises(voxgrid.RequestRefused, match="hash mismatch"):
        p.client.submit(_job(p, ref.weights_id, plan_hash="sha256:" + "0" * 64))


def test_malformed_and_oversized_requests_do_not_hurt_the_node(federation):
    with raw(federation, token=federation.scientist_token) as c:
        r = c.post("/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["title"] == "Invalid request"
        r = c.post("/jobs", json={"kind": "train"})
        assert r.status_code == 422 and "experiment_id" in r.json()["detail"]
        r = c.put("/weights", content=b"\x80\x04\x95" + b"pickle" * 10)
        assert r.status_code == 422 and "safetensors" in r.json()["detail"]
        assert _declared_huge_body(federation, "/v1/weights").startswith(b"HTTP/1.1 413")
        r = c.get("/jobs/does-not-exist")
        assert r.status_code == 404
        assert c.get("/health").json()["status"] == "ok"


def _declared_huge_body(fed, path):
    """Send headers announcing a 1 TB body (httpx will not lie about Content-Length); return the reply."""
    url = httpx.URL(fed.nodes[0].url)
    ctx = client_ssl_context(fed.ca_cert)
    with socket.create_connection((url.host, url.port), timeout=10) as raw_sock:
        with ctx.wrap_socket(raw_sock, server_hostname=url.host) as s:
            s.sendall((f"PUT {path} HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {fed.scientist_token}\r\n"
                       f"Content-Length: {10**12}\r\n\r\n").encode() + b"x" * 100)
            return s.recv(4096)


def test_federated_training_beats_the_untrained_model_and_resumes(federation, tmp_path):
    grid = federation.connect()
    ptrs = grid.search("#ct", "#pancreas")
    pl = plan(local_epochs=3)
    exp = voxgrid.Experiment(pl, ptrs, rounds=4, checkpoint_dir=tmp_path / "ckpt", name="e2e")
    # The untrained model, scored by the nodes on their validation splits.
    blob = tensors.dumps(exp.global_weights)
    untrained = []
    for p in ptrs:
        p.client.put_weights(blob)
        st = p.client.submit(_job(p, tensors.digest(blob), kind="evaluate", split="val", experiment_id="untrained"))
        while st.state in ("queued", "running"):
            st = p.client.job(st.job_id, wait=10)
        assert st.state == "done", st.error
        untrained.append(st.metrics.dice["pancreas"])
    exp.run(rounds=3, progress=False)
    assert len(exp.history) == 3 and all(s.ok for r in exp.history for s in r.sites)
    trained = [s.val_dice["pancreas"] for s in exp.history[-1].sites]
    # val Dice is scored by each node on its local model; the test Dice on the global model:
    test_global = [s.test_dice["pancreas"] for s in exp.history[-1].sites]
    assert np.mean(test_global) > np.mean(untrained) + 0.25, (untrained, test_global, trained)
    frame = exp.history_frame()
    assert set(frame["site"]) == {"site-a@node-site-a", "site-b@node-site-b", "site-c@node-site-c"}
    assert "global model Dice" in exp.dice_table()
    r0 = exp.history[0]
    assert r0.compute_s > 0 and r0.wall_s >= r0.train_wall_s >= r0.compute_s
    # Resume from the checkpoint: same experiment id, history kept, one more round.
    again = voxgrid.Experiment.resume(tmp_path / "ckpt", ptrs)
    assert again.experiment_id == exp.experiment_id and len(again.history) == 3
    for k, v in exp.global_weights.items():
        assert torch.equal(again.global_weights[k], v)
    again.run(rounds=4, progress=False)
    assert len(again.history) == 4 and json.loads((tmp_path / "ckpt" / "experiment.json").read_text())[
        "completed_rounds"] == 4


def test_a_node_that_times_out_is_dropped_and_too_few_answers_fail_the_round(federation):
    ptrs = federation.connect().search("#ct", "#pancreas")
    exp = voxgrid.Experiment(plan(local_epochs=2), ptrs[:1], min_nodes=1, job_timeout=0.3, evaluate=False,
                             name="slow")
    before = {k: v.clone() for k, v in exp.global_weights.items()}
    with pytest.raises(voxgrid.RoundFailed, match="did not finish within") as e:
        exp.run_round()
    assert "only 0 of 1 nodes answered" in str(e.value)
    assert not exp.history and all(torch.equal(before[k], v) for k, v in exp.global_weights.items())


def test_grid_roles_are_enforced(federation):
    node_token = (federation.root / "certs" / "node-site-a.grid.token").read_text().strip()
    as_node = voxgrid.GridClient(federation.grid.url, node_token, federation.ca_cert)
    assert as_node.whoami().role == "node"
    with pytest.raises(voxgrid.AccessRefused, match="role 'node'"):
        as_node.search("#ct")
    other = NodeClient(federation.nodes[1].url, federation.scientist_token, federation.ca_cert).info()
    with pytest.raises(voxgrid.AccessRefused, match="cannot register node 'node-site-b'"):
        as_node.register(other)  # a node cannot pose as another


def test_a_job_on_damaged_data_fails_without_leaking_paths_or_uids(federation, tmp_path):
    import shutil

    from voxgrid.nodes.ops import admin

    src = federation.root / "data" / "site-a"
    shutil.copytree(src, tmp_path / "copy")
    admin.add_dataset(federation.nodes[0].home, "damaged", tmp_path / "copy" / "images", tmp_path / "copy" / "labels",
                      policy="open", tags=["ct", "damaged"], label_names={1: "pancreas"}, splits=(0.5, 0.25, 0.25))
    for f in sorted((tmp_path / "copy" / "images").rglob("*.dcm"))[::7]:
        f.write_bytes(f.read_bytes()[:300])  # truncated after registration, as a failing disk would
    direct = voxgrid.connect(nodes=[federation.nodes[0].url], token=federation.scientist_token, ca=federation.ca_cert)
    p = direct.search("#damaged")[0]  # straight to the node: the grid learns of it at the next registration
    ref = p.client.put_weights(tensors.dumps(initial_weights(plan())))
    st = p.client.submit(_job(p, ref.weights_id, dataset="damaged", experiment_id="damaged"))
    while st.state in ("queued", "running"):
        st = p.client.job(st.job_id, wait=10)
    assert st.state == "failed" and "could not be loaded" in st.error
    assert str(tmp_path) not in st.error and ".dcm" not in st.error and "1.2." not in st.error
    assert p.client.health().status == "ok"


def test_a_node_killed_mid_round_is_dropped_and_serves_again_after_restart(federation):
    grid = federation.connect()
    ptrs = grid.search("#ct", "#pancreas")
    exp = voxgrid.Experiment(plan(local_epochs=30), ptrs, rounds=2, min_nodes=2, job_timeout=120, name="kill",
                             evaluate=False)
    owner = NodeClient(federation.nodes[2].url, federation.owner_token(2), federation.ca_cert)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", exp.run_round()))
    t.start()
    deadline = time.monotonic() + 60
    while not any(j.experiment_id == exp.experiment_id and j.state == "running" for j in owner.jobs()):
        assert time.monotonic() < deadline, "node 2 never started the job"
        time.sleep(0.05)
    federation.kill_node(2)
    t.join(180)
    result = out["r"]
    ok = {s.node: s.ok for s in result.sites}
    assert ok == {"node-site-a": True, "node-site-b": True, "node-site-c": False}
    assert "cannot reach" in result.sites[2].error or "Error" in result.sites[2].error
    # Restarted on the same port: registry intact, and it takes part in the next round again.
    federation.restart_node(2)
    owner = NodeClient(federation.nodes[2].url, federation.owner_token(2), federation.ca_cert)
    assert [d.name for d in owner.datasets()] == ["site-c"] and owner.datasets()[0].volumes == 4
    exp.plan = plan(local_epochs=1)  # keep the suite quick
    exp.run_round()
    assert all(s.ok for s in exp.history[-1].sites)
    # The job cut off by the kill was recovered from the store and ran to completion.
    deadline = time.monotonic() + 120
    while True:
        states = {j.state for j in owner.jobs() if j.experiment_id == exp.experiment_id}
        if states == {"done"}:
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.2)
