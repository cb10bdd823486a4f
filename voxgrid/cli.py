"""The ``voxgrid`` command.

Scientist-side and federation commands live here; node, grid and demo commands are plugged in
through the ``voxgrid.cli`` entry-point group so this package never imports ``voxgrid.nodes``.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _ca_init(args) -> None:
    from voxgrid.pki import create_ca

    paths = create_ca(Path(args.out), common_name=args.common_name)
    print(f"federation CA written: {paths.cert} (share it), {paths.key} (keep it offline)")


def _ca_issue(args) -> None:
    from voxgrid.pki import issue_certificate, load_ca

    paths = issue_certificate(load_ca(Path(args.ca_dir)), Path(args.out), args.name, args.host or ["localhost"])
    print(f"certificate for {args.name} ({', '.join(args.host or ['localhost'])}): {paths.cert}, key {paths.key}")


def _search(args) -> None:
    import voxgrid

    grid = voxgrid.connect(args.grid, token=args.token, ca=args.ca)
    print(grid.search(*args.tags))


def build_parser() -> argparse.ArgumentParser:
    import voxgrid

    parser = argparse.ArgumentParser(prog="voxgrid", description="Federated learning for medical imaging.")
    parser.add_argument("--version", action="version", version=f"voxgrid {voxgrid.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ca = sub.add_parser("ca", help="the federation's certificate authority").add_subparsers(dest="ca_cmd", required=True)
    p = ca.add_parser("init", help="create a federation CA")
    p.add_argument("--out", required=True, help="folder for ca.crt and ca.key")
    p.add_argument("--common-name", default="voxgrid federation CA")
    p.set_defaults(func=_ca_init)
    p = ca.add_parser("issue", help="issue a server certificate signed by the CA")
    p.add_argument("--ca-dir", required=True)
    p.add_argument("--name", required=True, help="certificate name, e.g. the site's node name")
    p.add_argument("--host", action="append", help="host name or IP the server is reached at (repeatable)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_ca_issue)

    p = sub.add_parser("search", help="search the grid for datasets by tag")
    p.add_argument("tags", nargs="*")
    p.add_argument("--grid", required=True)
    p.add_argument("--token", required=True, help="token or a file holding it")
    p.add_argument("--ca", required=True)
    p.set_defaults(func=_search)

    for ep in entry_points(group="voxgrid.cli"):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError) as exc:
        print(f"voxgrid: error: {exc}", file=sys.stderr)
        return 2
    return 0
