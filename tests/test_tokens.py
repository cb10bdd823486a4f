"""Tokens the data owner lists, revokes and lets expire: through the CLI, the admin functions and the owner API
of a real node process (which reads the tokens from its SQLite file on every request)."""

import json
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from homes import node_home, serving

from voxgrid.cli import main
from voxgrid.client import AccessRefused, AuthError, NodeClient, NotFoundError, RequestRefused
from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.db import Database, TokenError, hash_token
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.node import Caller, Forbidden, NodeService, Unauthorized
from voxgrid.nodes.service.store import NodeStore

FIELDS = {"id", "name", "role", "created", "expires", "revoked", "expired"}


@pytest.fixture
def home(tmp_path):
    return node_home(tmp_path).path


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def valid(home, token: str) -> tuple[str, str] | None:
    store = NodeStore(Home(home).db_file)
    try:
        return store.check_token(token)
    finally:
        store.close()


def audit(home) -> list[dict]:
    store = NodeStore(Home(home).db_file)
    try:
        return store.audit_log(1000)
    finally:
        store.close()


def owner_token(home) -> str:
    return Home(home).owner_token_file.read_text().strip()


def backdate(home, token: str) -> None:
    """What the passing of time does to a token issued with an expiry: its expiry is now in the past."""
    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat(timespec="milliseconds")
    with sqlite3.connect(Home(home).db_file) as c:
        assert c.execute("UPDATE tokens SET expires_at=? WHERE token_hash=?", (past, hash_token(token))).rowcount == 1


def test_expiry_is_stored_and_an_expired_token_is_refused(home, capsys):
    code, out, err = cli(capsys, "node", "token", "issue", "--home", home, "--name", "alice", "--expires", "2099-03-01")
    alice = out.strip()
    assert code == 0 and alice.startswith("vxg_") and "expires 2099-03-01T00:00:00.000+00:00" in err
    code, out, _ = cli(capsys, "node", "token", "issue", "--home", home, "--name", "bob", "--days", "90")
    bob = out.strip()
    listed = {t["name"]: t for t in admin.list_tokens(home, "node")}
    assert listed["alice"]["expires"] == "2099-03-01T00:00:00.000+00:00" and listed["owner"]["expires"] is None
    in_90 = datetime.fromisoformat(listed["bob"]["expires"]) - datetime.now(timezone.utc)
    assert timedelta(days=89, hours=23) < in_90 <= timedelta(days=90)
    assert valid(home, alice) == ("alice", "scientist") and valid(home, bob) == ("bob", "scientist")

    backdate(home, bob)
    assert valid(home, bob) is None and valid(home, alice) == ("alice", "scientist")
    service = NodeService(Home(home), start_executor=False)
    try:
        with pytest.raises(Unauthorized):
            service.authenticate(bob)
    finally:
        service.close()
    bob_row = next(t for t in admin.list_tokens(home, "node") if t["name"] == "bob")
    assert bob_row["expired"] and not bob_row["revoked"]
    assert any(e["action"] == "token.issue" and "alice" in e["detail"] and "expires 2099-03-01" in e["detail"]
               for e in audit(home))


def test_list_shows_each_token_and_no_secret(home, capsys):
    alice = admin.issue_token(home, "node", "alice", "scientist", days=30)
    code, out, _ = cli(capsys, "node", "token", "list", "--home", home, "--json")
    listed = json.loads(out)
    assert code == 0 and [t["name"] for t in listed] == ["owner", "alice"]
    assert all(set(t) == FIELDS for t in listed)
    assert listed[0] | {"created": None} == {"id": hash_token(owner_token(home))[:8], "name": "owner", "role": "owner",
                                              "created": None, "expires": None, "revoked": False, "expired": False}
    assert listed[1]["id"] == hash_token(alice)[:8] and listed[1]["role"] == "scientist" and listed[1]["expires"]
    code, table, _ = cli(capsys, "node", "token", "list", "--home", home)
    assert code == 0 and table.splitlines()[0].split()[:3] == ["ID", "NAME", "ROLE"]
    assert hash_token(alice)[:8] in table and "valid" in table
    for secret in (alice, owner_token(home), hash_token(alice), hash_token(owner_token(home)),
                   hash_token(alice)[:12]):
        assert secret not in out and secret not in table


def test_revoke_by_id_and_by_name(home, capsys):
    first, second = (admin.issue_token(home, "node", "alice", "scientist") for _ in range(2))
    bob = admin.issue_token(home, "node", "bob", "scientist")
    code, out, _ = cli(capsys, "node", "token", "revoke", "--home", home, "--id", hash_token(first)[:8])
    assert code == 0 and hash_token(first)[:8] in out
    assert valid(home, first) is None and valid(home, second) == ("alice", "scientist")
    code, out, _ = cli(capsys, "node", "token", "revoke", "--home", home, "--name", "alice")
    assert code == 0 and "revoked 1 token(s)" in out and hash_token(second)[:8] in out
    assert valid(home, second) is None and valid(home, bob) == ("bob", "scientist")
    status = {t["id"]: t["revoked"] for t in admin.list_tokens(home, "node")}
    assert status[hash_token(first)[:8]] and status[hash_token(second)[:8]] and not status[hash_token(bob)[:8]]
    revokes = [e["detail"] for e in audit(home) if e["action"] == "token.revoke"]
    assert len(revokes) == 2 and all("alice" in d for d in revokes)
    code, _, err = cli(capsys, "node", "token", "revoke", "--home", home, "--name", "alice")
    assert code == 2 and "already revoked" in err


def test_the_last_owner_token_cannot_be_revoked(home, capsys):
    owner = owner_token(home)
    for how in (("--name", "owner"), ("--id", hash_token(owner)[:8])):
        code, _, err = cli(capsys, "node", "token", "revoke", "--home", home, *how)
        assert code == 2 and "would leave no valid owner token" in err and "--role owner" in err
    assert valid(home, owner) == ("owner", "owner")
    assert not any(e["action"] == "token.revoke" for e in audit(home))
    second = admin.issue_token(home, "node", "it-admin", "owner")
    assert cli(capsys, "node", "token", "revoke", "--home", home, "--name", "owner")[0] == 0
    assert valid(home, owner) is None
    code, _, err = cli(capsys, "node", "token", "revoke", "--home", home, "--id", hash_token(second)[:8])
    assert code == 2 and "no valid owner token" in err and valid(home, second) == ("it-admin", "owner")


@pytest.mark.parametrize("args, problem", [
    (("revoke", "--name", "mallory"), "no token is named 'mallory'"),
    (("revoke", "--id", "0123abcd"), "no token has id 0123abcd"),
    (("revoke", "--id", "xyz"), "malformed token id 'xyz'"),
    (("issue", "--name", "carol", "--expires", "2020-01-01"), "expiry date 2020-01-01 is not in the future"),
    (("issue", "--name", "carol", "--expires", "next tuesday"), "malformed expiry date 'next tuesday'"),
    (("issue", "--name", "carol", "--expires", "2027-02-30"), "malformed expiry date '2027-02-30'"),
    (("issue", "--name", "carol", "--days", "0"), "--days must be a number of days from 1 to 36500"),
])
def test_bad_input_is_named_and_changes_nothing(home, capsys, args, problem):
    admin.issue_token(home, "node", "alice", "scientist")
    before = (admin.list_tokens(home, "node"), audit(home))
    code, out, err = cli(capsys, "node", "token", args[0], "--home", home, *args[1:])
    assert code == 2 and problem in err and out == ""
    assert (admin.list_tokens(home, "node"), audit(home)) == before


def test_both_expiry_flags_are_refused(home, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["node", "token", "issue", "--home", str(home), "--name", "x", "--days", "3", "--expires", "2099-01-01"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(TokenError, match="not both"):
        admin.issue_token(home, "node", "x", "scientist", expires="2099-01-01", days=3)


def test_an_old_tokens_table_gains_the_expiry_column(tmp_path):
    path = tmp_path / "old.db"
    token = "vxg_" + "t" * 40
    with sqlite3.connect(path) as c:  # the tokens table as releases before expiry created it
        c.execute("CREATE TABLE tokens (token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, "
                  "created_at TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0)")
        c.execute("INSERT INTO tokens VALUES (?, 'alice', 'scientist', '2024-01-01T00:00:00.000+00:00', 0)",
                  (hash_token(token),))
    db = Database(path, "")
    try:
        assert db.check_token(token) == ("alice", "scientist")
        assert db.tokens()[0]["expires"] is None
        db.add_token("bob", "scientist", expires_at="2099-01-01T00:00:00.000+00:00")
    finally:
        db.close()
    Database(path, "").close()  # opening it again is a no-op
    with sqlite3.connect(path) as c:
        assert [r[1] for r in c.execute("PRAGMA table_info(tokens)")].count("expires_at") == 1


def test_grid_tokens_are_listed_and_revoked(tmp_path, capsys):
    from voxgrid.client import grid_credential
    from voxgrid.nodes.http.grid import SCHEMA
    from voxgrid.pki import create_ca, issue_certificate

    ca = create_ca(tmp_path / "ca")
    cert = issue_certificate(ca, tmp_path / "certs", "grid", ["127.0.0.1"])
    grid = tmp_path / "grid"
    admin.init_home("grid", grid, "grid", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    carol = admin.issue_token(grid, "grid", "carol", "scientist", days=7)
    node = admin.issue_token(grid, "grid", "node-a", "node")
    code, out, _ = cli(capsys, "grid", "token", "list", "--home", grid, "--json")
    listed = {t["name"]: t for t in json.loads(out)}
    assert code == 0 and set(listed) == {"owner", "carol", "node-a"} and listed["carol"]["expires"]
    assert listed["carol"]["id"] == admin.short_token_id("grid", carol) == hash_token(grid_credential(carol))[:8]
    assert carol not in out and grid_credential(carol) not in out
    assert cli(capsys, "grid", "token", "revoke", "--home", grid, "--id", listed["carol"]["id"])[0] == 0
    db = Database(Home(grid, "grid").db_file, SCHEMA, issue_as=grid_credential)
    try:  # the grid checks what holders send it: grid_credential(token)
        assert db.check_token(grid_credential(carol)) is None
        assert db.check_token(grid_credential(node)) == ("node-a", "node")
    finally:
        db.close()
    code, _, err = cli(capsys, "grid", "token", "revoke", "--home", grid, "--name", "owner")
    assert code == 2 and "no valid owner token" in err


def test_owner_service_methods_refuse_a_scientist(home):
    service = NodeService(Home(home), start_executor=False)
    try:
        for call in (lambda c: service.tokens(c), lambda c: service.revoke_token(c, "0123abcd")):
            with pytest.raises(Forbidden, match="needs one of: owner"):
                call(Caller("alice", "scientist"))
    finally:
        service.close()


@pytest.fixture
def running_node(tmp_path):
    """A real node process on a free port (HTTPS, its own CA) serving the home ``node_home`` made."""
    home = node_home(tmp_path).path
    with serving(home, tmp_path / "node.log") as (url, ca):
        yield home, url, ca


def test_a_running_node_refuses_a_token_at_once_after_revoke_or_expiry(running_node, capsys):
    home, url, ca = running_node
    alice = admin.issue_token(home, "node", "alice", "scientist")
    bob = admin.issue_token(home, "node", "bob", "scientist")
    dave = admin.issue_token(home, "node", "dave", "scientist", days=1)
    with NodeClient(url, alice, ca, timeout=30) as a, NodeClient(url, bob, ca, timeout=30) as b, \
            NodeClient(url, dave, ca, timeout=30) as d, NodeClient(url, owner_token(home), ca, timeout=30) as owner:
        assert a.whoami().name == "alice" and b.whoami().name == "bob" and d.whoami().name == "dave"

        # the owner routes refuse a scientist
        with pytest.raises(AccessRefused) as exc:
            a.tokens()
        assert exc.value.status == 403
        with pytest.raises(AccessRefused):
            a.revoke_token(hash_token(bob)[:8])
        assert b.whoami().name == "bob"

        # `voxgrid node token revoke` on the node's home: the running node refuses alice's next request
        r = subprocess.run([sys.executable, "-m", "voxgrid", "node", "token", "revoke", "--home", str(home),
                            "--name", "alice"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and hash_token(alice)[:8] in r.stdout, r.stderr
        with pytest.raises(AuthError) as exc:
            a.whoami()
        assert exc.value.status == 401

        # an expired token: refused from the moment its expiry passes
        backdate(home, dave)
        with pytest.raises(AuthError):
            d.datasets()

        # the owner API: list (no secret), revoke by id, errors
        listed = owner.tokens()
        assert {t.name: (t.revoked, t.expired) for t in listed} == {
            "owner": (False, False), "alice": (True, False), "bob": (False, False), "dave": (False, True)}
        raw = json.dumps([t.model_dump() for t in listed])
        assert all(s not in raw for s in (alice, bob, owner_token(home), hash_token(bob)))
        revoked = owner.revoke_token(hash_token(bob)[:8])
        assert revoked.name == "bob" and revoked.revoked
        with pytest.raises(AuthError):
            b.whoami()
        with pytest.raises(NotFoundError):
            owner.revoke_token("0123abcd")
        with pytest.raises(RequestRefused, match="no valid owner token"):
            owner.revoke_token(hash_token(owner_token(home))[:8])
        assert owner.whoami().role == "owner"
        assert any(e.action == "token.revoke" and e.actor == "owner" and "bob" in e.detail for e in owner.audit())
