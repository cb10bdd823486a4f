"""``voxgrid node ...``, ``voxgrid grid ...`` and ``voxgrid demo``: commands a site's IT person can script."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated numbers like 0.6,0.2,0.2, got {text!r}") from None


def _logging(args) -> None:
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _home_arg(p, kind: str) -> None:
    p.add_argument("--home", required=True, type=Path, help=f"the {kind}'s home folder")


def _init(kind: str):
    def run(args):
        admin.init_home(kind, args.home, args.name, ca_cert=args.ca, cert=args.cert, key=args.key,
                                host=args.host, port=args.port, public_url=args.public_url,
                                **({"device": args.device, "threads": args.threads, "data_roots": args.data_root or [],
                                    "console_host": args.console_host,
                                    "console_port": None if args.console_port == "off" else args.console_port}
                                   if kind == "node" else {}))
        if kind == "node" and args.grid:
            admin.set_grid(args.home, args.grid, args.grid_token_file)
        if kind == "node" and args.connect == "outbound":
            admin.set_outbound(args.home, args.proxy, args.proxy_credentials)
        print(f"{kind} home created at {args.home.resolve()}; owner token in {Home(args.home, kind).owner_token_file}")
    return run


def _add_init(sub, kind: str) -> None:
    p = sub.add_parser("init", help=f"create a {kind} home (config, TLS material, SQLite store, owner token)")
    _home_arg(p, kind)
    p.add_argument("--name", required=True)
    p.add_argument("--ca", required=True, type=Path, help="federation CA certificate (PEM)")
    p.add_argument("--cert", required=True, type=Path, help="this server's certificate (PEM)")
    p.add_argument("--key", required=True, type=Path, help="this server's private key (PEM)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--public-url", help="URL others reach this server at (default https://HOST:PORT)")
    if kind == "node":
        p.add_argument("--grid", help="grid URL to register with")
        p.add_argument("--grid-token-file", type=Path, help="file holding this node's grid token")
        p.add_argument("--connect", choices=["direct", "outbound"], default="direct",
                       help="'direct': listen on HOST:PORT for scientists; 'outbound': listen on nothing and dial "
                            "the grid, which relays scientists to this node (for sites that allow outbound only)")
        p.add_argument("--proxy", help="outbound: forward proxy to reach the grid, http://host:port "
                                       "(default: HTTPS_PROXY / NO_PROXY from the environment)")
        p.add_argument("--proxy-credentials", type=Path, metavar="FILE",
                       help="outbound: file holding the proxy's 'user:password' (copied into the home)")
        p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads for the executor (0: torch's default)")
        _data_root_arg(p)
        _console_args(p, 8444, "127.0.0.1")
    p.set_defaults(func=_init(kind))


def _console_port(text: str) -> int | str:
    if text == "off":
        return "off"
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"--console-port must be from 0 to 65535 or 'off', got {text}")
    return port


def _console_args(p, port, host) -> None:
    what = "(default %(default)s)" if port is not None else "(default: as configured)"
    p.add_argument("--console-host", default=host, help=f"the owner console's listen address {what}; keep it on "
                                                        "loopback and reach it through an SSH tunnel")
    p.add_argument("--console-port", type=_console_port, default=port, metavar="PORT|off",
                   help=f"the owner console's port, HTTPS with the node's certificate {what}; 0: any free port "
                        "(HOME/run.json names it); off: no console")


def _data_root_arg(p) -> None:
    p.add_argument("--data-root", action="append", type=Path, metavar="PATH",
                   help="a folder datasets may be registered from (repeatable); a volume whose resolved path "
                        "(symlinks followed) lies outside every data root and HOME/cache is refused. Default: none")


def _config_set(args) -> None:
    if not args.data_root and not args.no_data_roots:
        raise ValueError("give --data-root PATH (repeatable) or --no-data-roots")
    if args.data_root and args.no_data_roots:
        raise ValueError("--data-root and --no-data-roots exclude each other")
    roots = admin.set_data_roots(args.home, [] if args.no_data_roots else args.data_root)
    print(json.dumps({"data_roots": roots}))


LIMIT_FLAGS = (("--max-patch-voxels", int, "voxels in one patch (default 128^3 = 2097152)"),
               ("--max-batch-size", int, "plan.batch_size (default 32)"),
               ("--max-sw-batch-size", int, "plan.sw_batch_size (default 16)"),
               ("--max-samples-per-volume", int, "plan.samples_per_volume (default 32)"),
               ("--max-steps-per-job", int, "optimiser steps of one train job (default 10000)"),
               ("--max-parameters", int, "parameters of the plan's network (default 100000000)"),
               ("--max-volume-voxels", int, "voxels of one volume after the plan's transforms (default 2^29)"),
               ("--max-network-levels", int, "entries of any list in plan.network, e.g. UNet channels (default 16)"),
               ("--max-job-seconds", float, "wall time of one job (default 3600)"),
               ("--max-worker-memory-mb", int, "resident memory of the executor in MiB (default: 75%% of RAM)"),
               ("--max-queued-jobs", int, "jobs one scientist may have queued or running (default 100)"),
               ("--max-job-restarts", int, "runs again of a job the node stopped during (default 1)"))


def _limits(args) -> None:
    changes = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in LIMIT_FLAGS}
    changes = {k: v for k, v in changes.items() if v is not None}
    for name in args.reset or ():
        changes[name.replace("-", "_")] = None
    print(json.dumps(admin.set_limits(args.home, **changes)))


def _add_limits(node) -> None:
    p = node.add_parser("limits", help="show or change the node's job limits (restart a running node to apply them)")
    _home_arg(p, "node")
    for flag, kind, text in LIMIT_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--reset", action="append", metavar="NAME",
                   help="return a limit to its default, e.g. max-job-seconds (repeatable)")
    p.set_defaults(func=_limits)
    p = node.add_parser("cancel", help="cancel a queued or running job (any scientist's)")
    _home_arg(p, "node")
    p.add_argument("job_id", metavar="JOB")
    p.set_defaults(func=lambda args: print(json.dumps(admin.cancel_job(args.home, args.job_id))))


def _token(kind: str):
    def run(args):
        import sys

        token = admin.issue_token(args.home, kind, args.name, args.role, args.token_file, expires=args.expires,
                                  days=args.days)
        if args.token_file:
            print(f"{args.role} token for {args.name} authorised (file {args.token_file})")
        else:
            print(token)
        expiry = next((t["expires"] for t in admin.list_tokens(args.home, kind)
                       if t["id"].startswith(admin.short_token_id(kind, token))), None)
        print(f"token id {admin.short_token_id(kind, token)}; expires {expiry or 'never'}", file=sys.stderr)
    return run


def _token_status(t: dict) -> str:
    return "revoked" if t["revoked"] else "expired" if t["expired"] else "valid"


def _token_list(kind: str):
    def run(args):
        tokens = admin.list_tokens(args.home, kind)
        if args.json:
            print(json.dumps(tokens, indent=1))
            return
        def day(stamp: str | None) -> str:
            return stamp[:16].replace("T", " ") if stamp else "never"

        rows = [("ID", "NAME", "ROLE", "CREATED (UTC)", "EXPIRES (UTC)", "STATUS")]
        rows += [(t["id"], t["name"], t["role"], day(t["created"]), day(t["expires"]), _token_status(t))
                 for t in tokens]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return run


def _token_revoke(kind: str):
    def run(args):
        revoked = admin.revoke_token(args.home, kind, name=args.name, token_id=args.id)
        print(f"revoked {len(revoked)} token(s): " + ", ".join(f"{t['id']} ({t['role']} {t['name']})" for t in revoked))
    return run


def _add_token(sub, kind: str, default_role: str) -> None:
    tok = sub.add_parser("token", help="issue, list and revoke access tokens").add_subparsers(dest="token_cmd",
                                                                                             required=True)
    p = tok.add_parser("issue", help="issue a token (printed, or written to --token-file)")
    _home_arg(p, kind)
    p.add_argument("--name", required=True, help="who holds the token (a scientist, or a node at the grid)")
    p.add_argument("--role", default=default_role)
    p.add_argument("--token-file", type=Path,
                   help="write the token here; if the file exists, authorise the token it holds instead")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--expires", metavar="DATE",
                      help="the token stops working at 00:00 UTC of this date (YYYY-MM-DD) or at this ISO 8601 "
                           "time; default: never")
    when.add_argument("--days", type=int, help="the token stops working this many days from now; default: never")
    p.set_defaults(func=_token(kind))
    p = tok.add_parser("list", help="every token: id, name, role, created, expires, status (never the token)")
    _home_arg(p, kind)
    p.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    p.set_defaults(func=_token_list(kind))
    p = tok.add_parser("revoke", help=f"revoke tokens; a running {kind} refuses them from its next request")
    _home_arg(p, kind)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", help="revoke every valid token of this name")
    which.add_argument("--id", help="revoke the one token with this id (as 'token list' shows it)")
    p.set_defaults(func=_token_revoke(kind))


def _dataset_add(args) -> None:
    if args.pacs:
        return _dataset_add_pacs(args)
    pacs_only = [flag for flag, value in (("--pacs-user", args.pacs_user), ("--pacs-password-file",
                 args.pacs_password_file), ("--calling-ae", args.calling_ae), ("--study-description",
                 args.study_description), ("--since", args.since), ("--until", args.until),
                 ("--min-slices", args.min_slices), ("--allow-resample", args.allow_resample)) if value]
    if pacs_only:
        raise ValueError(f"{', '.join(pacs_only)} only apply with --pacs")
    summary = admin.add_dataset(args.home, args.name, args.images, args.labels, tags=args.tags.split(","),
                                label_names=args.label_names, splits=_floats(args.splits),
                                description=args.description, modality=args.modality or "CT",
                                replace=args.replace, seed=args.seed, policy=args.policy)
    print(json.dumps(summary))


def _dataset_add_pacs(args) -> None:
    from voxgrid.datasets import SeriesRules
    from voxgrid.datasets.pacs import PacsError, PacsQuery

    query = PacsQuery(modality=args.modality, study_description=args.study_description,
                      study_date_from=args.since, study_date_to=args.until)
    rules = SeriesRules(modalities=(args.modality,) if args.modality else (), min_slices=args.min_slices or 1)
    try:
        summary = admin.add_dataset_from_pacs(
            args.home, args.name, source=args.pacs, username=args.pacs_user, password_file=args.pacs_password_file,
            calling_ae=args.calling_ae or "VOXGRID", query=query, rules=rules, labels=args.labels,
            tags=args.tags.split(","), label_names=args.label_names, splits=_floats(args.splits),
            description=args.description, replace=args.replace, allow_resample=args.allow_resample, seed=args.seed,
            policy=args.policy)
    except PacsError as exc:  # exit 2 with the server and the step named; the registry is untouched
        raise ConnectionError(f"PACS pull failed, dataset {args.name!r} not changed: {exc}") from None
    print(json.dumps(summary))


def _dataset_list(args) -> None:
    from voxgrid.nodes.service.store import NodeStore

    home = Home(args.home, "node")
    home.load()
    store = NodeStore(home.db_file)
    try:
        for ds in store.datasets():
            print(ds.info().model_dump_json())
    finally:
        store.close()


def _budget_set(args) -> None:
    budgets = admin.set_budget(args.home, args.dataset, args.epsilon, args.delta, scientist=args.scientist)
    print(json.dumps(budgets))


def _budget_show(args) -> None:
    print(json.dumps(admin.ledger_view(args.home), indent=1))


def _add_budget(node) -> None:
    b = node.add_parser("budget", help="privacy budgets and the ledger").add_subparsers(dest="budget_cmd",
                                                                                         required=True)
    p = b.add_parser("set", help="set the (epsilon, delta) budget of a dataset, for everyone or one scientist")
    _home_arg(p, "node")
    p.add_argument("--dataset", required=True)
    p.add_argument("--scientist", help="the scientist (token name) it binds; default: all scientists together")
    p.add_argument("--epsilon", required=True, type=float)
    p.add_argument("--delta", required=True, type=float)
    p.set_defaults(func=_budget_set)
    p = b.add_parser("show", help="print the ledger: budgets with spend, releases, refusals (JSON)")
    _home_arg(p, "node")
    p.set_defaults(func=_budget_show)


def _privacy_report(args) -> None:
    js, page = admin.privacy_report(args.home, args.out)
    print(f"privacy report: {page} (data: {js})")


def _cache(args) -> None:
    from voxgrid.nodes.worker.prepcache import PrepCache

    home = Home(args.home, "node")
    home.load()  # a clear error for a folder that is not a node home
    cache = PrepCache(home.cache / "prepared")
    if args.cache_cmd == "clear":
        print(f"removed {cache.clear()} preprocessed volume(s) from {cache.root}")
    else:
        print(json.dumps(cache.info(), indent=1))


def _cert_rotate(kind: str):
    def run(args):
        out = admin.rotate_certificate(args.home, kind, cert=args.cert, key=args.key, bundle=args.bundle,
                                       ca_dir=args.ca_dir, hosts=args.host, days=args.days)
        print(json.dumps(out))
        if out["running_pid"]:
            print(f"the {kind} is running (pid {out['running_pid']}): restart it to serve the new certificate")
    return run


def _add_cert(sub, kind: str) -> None:
    c = sub.add_parser("cert", help="the server's TLS certificate").add_subparsers(dest="cert_cmd", required=True)
    p = c.add_parser("rotate", help="install a new certificate and key (checked against the federation CA, the "
                                    "key and the name first; the old pair is kept in HOME/tls/backup)")
    _home_arg(p, kind)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cert", type=Path, help="the new certificate (PEM), with --key")
    src.add_argument("--bundle", type=Path, help="a provisioned kit folder holding server.crt and server.key")
    src.add_argument("--ca-dir", type=Path, help="issue the new certificate here from the CA files (ca.crt, ca.key)")
    p.add_argument("--key", type=Path, help="the new private key (PEM), with --cert")
    p.add_argument("--host", action="append", help="with --ca-dir: a host name or IP to certify (repeatable; "
                                                   "default: those of the current certificate)")
    p.add_argument("--days", type=int, default=825, help="with --ca-dir: validity in days")
    p.set_defaults(func=_cert_rotate(kind))


def _start_node(args) -> None:
    from voxgrid.nodes.http.server import serve_node

    _logging(args)
    serve_node(Home(args.home, "node"), args.host, args.port, args.console_host, args.console_port)


def _start_grid(args) -> None:
    from voxgrid.nodes.http.server import serve_grid

    _logging(args)
    serve_grid(Home(args.home, "grid"), args.host, args.port)


def _register(args) -> None:
    from voxgrid.nodes.http.server import register_with_grid
    from voxgrid.nodes.service.node import NodeService

    if args.grid:
        admin.set_grid(args.home, args.grid, args.grid_token_file)
    service = NodeService(Home(args.home, "node"), start_executor=False)
    try:
        run = json.loads(service.home.run_file.read_text()) if service.home.run_file.exists() else None
        if run:
            service.config.public_url = service.config.public_url or run["url"]
        if not register_with_grid(service, attempts=3):
            raise ConnectionError(f"could not register with grid {service.config.grid_url}")
        print(f"registered {service.config.name} with {service.config.grid_url}")
    finally:
        service.close()


def _status(kind: str):
    def run(args):
        from voxgrid.client import GridClient, NodeClient

        home = Home(args.home, kind)
        home.load()
        if not home.run_file.exists():
            raise ConnectionError(f"{kind} at {home.path} is not running (no run.json)")
        state = json.loads(home.run_file.read_text())
        url, token = state["url"], home.owner_token_file.read_text().strip()
        client = GridClient if kind == "grid" else NodeClient
        # An outbound node listens on nothing but its private socket: its owner, on its machine, uses that.
        with client(url, token, home.tls / "ca.crt", timeout=10, uds=state.get("socket")) as c:
            console = {"console": state["console"]} if state.get("console") else {}
            print(json.dumps({"url": url, **console, **c.health().model_dump()}))
            if kind == "grid":
                _print_links(c.links())
    return run


def _print_links(links) -> None:
    """The grid's outbound nodes: who is connected, since when, last traffic (the operator's view)."""
    import datetime

    if not links:
        print("no outbound node is connected")
        return
    def stamp(t: float) -> str:
        return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")

    for link in links:
        print(f"{link.node}: connected since {stamp(link.connected_since)} from {link.peer}; last traffic "
              f"{stamp(link.last_traffic)}; tunnels {link.tunnels_open} open, {link.tunnels_total} in all; "
              f"{link.bytes_up} bytes up, {link.bytes_down} down")


def _add_start_status(sub, kind: str, start) -> None:
    p = sub.add_parser("start", help=f"serve the {kind} over HTTPS (foreground; SIGTERM or Ctrl-C stops it)")
    _home_arg(p, kind)
    p.add_argument("--host", help="override the listen address")
    p.add_argument("--port", type=int, help="override the port (0: any free port; see HOME/run.json)")
    p.add_argument("--verbose", action="store_true")
    if kind == "node":
        _console_args(p, None, None)
    p.set_defaults(func=start)
    p = sub.add_parser("status", help=f"health of the running {kind}")
    _home_arg(p, kind)
    p.set_defaults(func=_status(kind))


def register(sub) -> None:
    """Entry point: add node, grid and demo commands to the ``voxgrid`` parser."""
    node = sub.add_parser("node", help="run and administer a site's data node").add_subparsers(dest="node_cmd",
                                                                                               required=True)
    _add_init(node, "node")
    ds = node.add_parser("dataset", help="datasets of the node").add_subparsers(dest="ds_cmd", required=True)
    p = ds.add_parser("add", help="register a folder of NIfTI images (+labels), DICOM series, or series pulled "
                                  "from a PACS as a dataset")
    _home_arg(p, "node")
    p.add_argument("--name", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="NIfTI files, or one subfolder per DICOM series")
    src.add_argument("--pacs", metavar="SOURCE",
                     help="pull from a PACS into HOME/cache/pacs/NAME (resumable): dicomweb+https://host:port/dicom-web "
                          "(dicomweb+http:// for a PACS on this machine) or dimse://CALLEDAE@host:port")
    p.add_argument("--labels", type=Path, help="NIfTI label maps named like the images (<case>.nii.gz); with --pacs "
                                               "<case> is series-<hash> (a run without --labels lists them)")
    p.add_argument("--tags", required=True, help="comma-separated, e.g. ct,pancreas")
    p.add_argument("--label-names", required=True, help="label values, e.g. 1=pancreas,2=tumor")
    p.add_argument("--splits", default="0.6,0.2,0.2", help="train,val,test fractions")
    p.add_argument("--description", default="")
    p.add_argument("--modality", help="dataset modality (default CT); with --pacs: the series modality to pull "
                                      "and accept (default: any)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    p.add_argument("--replace", action="store_true", help="rebuild an existing dataset of that name")
    p.add_argument("--policy", choices=["review", "open", "rules"],
                   help="who decides which plans run on it (new datasets: review; a replaced one keeps its own; "
                        "'voxgrid node policy set' changes it and sets rules)")
    g = p.add_argument_group("PACS (with --pacs)")
    g.add_argument("--pacs-user", help="DICOMweb user name")
    g.add_argument("--pacs-password-file", type=Path, help="file holding the DICOMweb password")
    g.add_argument("--calling-ae", help="this node's AE title, known to the PACS (DIMSE; default VOXGRID)")
    g.add_argument("--study-description", help="DICOM wildcard match, e.g. '*ABD*'")
    g.add_argument("--since", help="first study date, YYYYMMDD")
    g.add_argument("--until", help="last study date, YYYYMMDD")
    g.add_argument("--min-slices", type=int, help="skip series with fewer slices")
    g.add_argument("--allow-resample", action="store_true",
                   help="resample series with uneven gaps or gantry tilt instead of refusing them")
    p.set_defaults(func=_dataset_add)
    p = ds.add_parser("list", help="published metadata of each dataset")
    _home_arg(p, "node")
    p.set_defaults(func=_dataset_list)
    cfg = node.add_parser("config", help="change the node's configuration").add_subparsers(dest="config_cmd",
                                                                                           required=True)
    p = cfg.add_parser("set", help="replace the data roots (restart a running node to apply them to its jobs)")
    _home_arg(p, "node")
    _data_root_arg(p)
    p.add_argument("--no-data-roots", action="store_true", help="remove every data root (no restriction)")
    p.set_defaults(func=_config_set)
    _add_token(node, "node", "scientist")
    from voxgrid.nodes.ops.approvals_cli import add_commands as add_approval_commands  # policy, requests

    add_approval_commands(node)
    _add_budget(node)
    _add_limits(node)
    _add_cert(node, "node")
    c = node.add_parser("cache", help="the executor's cache of preprocessed volumes").add_subparsers(
        dest="cache_cmd", required=True)
    for name, text in (("info", "entries and bytes (JSON)"), ("clear", "remove every entry; they are rebuilt on use")):
        p = c.add_parser(name, help=text)
        _home_arg(p, "node")
        p.set_defaults(func=_cache)
    _add_start_status(node, "node", _start_node)
    p = node.add_parser("register", help="register the node's published metadata with its grid")
    _home_arg(p, "node")
    p.add_argument("--grid")
    p.add_argument("--grid-token-file", type=Path)
    p.set_defaults(func=_register)

    grid = sub.add_parser("grid", help="run the grid directory").add_subparsers(dest="grid_cmd", required=True)
    _add_init(grid, "grid")
    _add_token(grid, "grid", "scientist")
    _add_cert(grid, "grid")
    _add_start_status(grid, "grid", _start_grid)

    from voxgrid.nodes.ops.deploy_cli import add_commands as add_deploy_commands  # doctor, service-files, provision

    add_deploy_commands(sub, node, grid)

    privacy = sub.add_parser("privacy", help="a data node's privacy record").add_subparsers(dest="privacy_cmd",
                                                                                             required=True)
    p = privacy.add_parser("report", help="write the privacy report (HTML with plots, and JSON) of a node")
    _home_arg(p, "node")
    p.add_argument("--out", required=True, type=Path, help="folder for privacy-report.html and .json")
    p.set_defaults(func=_privacy_report)

    from voxgrid.nodes.local.demo import add_demo_parser

    add_demo_parser(sub)
