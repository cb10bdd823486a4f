"""Deployment commands, plugged in by :func:`nodes.cli.register`: ``voxgrid node|grid doctor``,
``voxgrid node|grid service-files``, ``voxgrid grid import-tokens``, ``voxgrid provision``, ``voxgrid wheelhouse``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _doctor(kind: str):
    def run(args):
        from voxgrid.nodes.ops import doctor

        checks = doctor.diagnose(args.home, kind, timeout=args.timeout, gpu=kind == "node")
        if args.json:
            print(json.dumps(doctor.as_json(checks), indent=1))
        else:
            for c in checks:
                print(c.line())
            print(doctor.summary(checks))
        if doctor.failed(checks):
            sys.exit(1)
    return run


def _service_files(kind: str):
    def run(args):
        from voxgrid.nodes.ops.launchers import write_service_files

        for path in write_service_files(args.home, args.out, kind, user=args.user, voxgrid=args.voxgrid):
            print(path)
    return run


def _import_tokens(args) -> None:
    from voxgrid.nodes.ops.provision import import_token_hashes

    n = import_token_hashes(args.home, args.file, "grid")
    print(f"{n} token hash(es) from {args.file} authorised at the grid")


def _provision(args) -> None:
    from voxgrid.nodes.ops.provision import provision

    print(json.dumps(provision(args.project, args.out), indent=1))


def _wheelhouse(args) -> None:
    from voxgrid.nodes.ops.wheelhouse import build

    wheels = build(args.out, source=args.source, extras=args.extras, torch=args.torch, platform=args.platform,
                   python_version=args.python_version)
    print(f"{len(wheels)} wheels in {args.out}; install offline with: "
          f"VOXGRID_WHEELHOUSE={args.out} bash scripts/install.sh VENV")


def add_commands(sub, node, grid) -> None:
    """``sub``: the top-level subparsers; ``node``/``grid``: the node and grid command subparsers."""
    for kind, parent in (("node", node), ("grid", grid)):
        p = parent.add_parser("doctor", help=f"check the {kind} home: config, certificate, key, store, grid, "
                                             "GPU, disk (exit 1 on any failure)")
        p.add_argument("--home", required=True, type=Path, help=f"the {kind}'s home folder")
        p.add_argument("--json", action="store_true", help="print the checks as JSON")
        p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the grid")
        p.set_defaults(func=_doctor(kind))
        p = parent.add_parser("service-files", help=f"write a systemd unit and a shell launcher for the {kind}")
        p.add_argument("--home", required=True, type=Path, help=f"the {kind}'s home folder")
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--user", default="voxgrid", help="the dedicated system user the unit runs as")
        p.add_argument("--voxgrid", type=Path, help="the voxgrid executable (default: this environment's)")
        p.set_defaults(func=_service_files(kind))
    p = grid.add_parser("import-tokens", help="authorise node tokens by hash (a provisioned kit's node-tokens.json)")
    p.add_argument("--home", required=True, type=Path, help="the grid's home folder")
    p.add_argument("--file", required=True, type=Path)
    p.set_defaults(func=_import_tokens)
    p = sub.add_parser("provision", help="a startup kit per site and for the grid, from one project file")
    p.add_argument("--project", required=True, type=Path, help="project.json: federation, grid, sites")
    p.add_argument("--out", required=True, type=Path, help="folder for ca/ (keep offline) and one kit per server")
    p.set_defaults(func=_provision)
    p = sub.add_parser("wheelhouse", help="wheels of voxgrid and every dependency, for an offline install")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--source", type=Path, help="voxgrid source tree (default: this installation's)")
    p.add_argument("--extras", default="", help="extras to include, e.g. notebook")
    p.add_argument("--torch", default="torch==2.13.0", help="the torch requirement")
    p.add_argument("--platform", help="target platform tag, e.g. manylinux2014_x86_64 (binary wheels only)")
    p.add_argument("--python-version", help="target Python, e.g. 3.11 (binary wheels only)")
    p.set_defaults(func=_wheelhouse)
