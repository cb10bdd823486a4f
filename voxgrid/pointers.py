"""Pointers: the scientist's handles to remote datasets. Metadata only; data requests are refused."""

from __future__ import annotations

import html
from dataclasses import dataclass

from voxgrid.client import AccessRefused, GridClient, NodeClient, Relayed
from voxgrid.wire import DatasetInfo, normalise_tag

_COLUMNS = ("node", "dataset", "tags", "volumes", "labels", "splits", "shape", "spacing (mm)")


def _range(r, fmt) -> str:
    """((min per axis), (max per axis)) -> ``512x512x80-120``: one figure for an axis that does not vary."""
    if r is None:
        return ""
    return "x".join(fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}" for lo, hi in zip(*r, strict=True))


_REFUSED = ("a DatasetPointer holds metadata only: the voxels of {ds!r} stay at node {node!r}. "
            "Send computation to the data instead: voxgrid.Experiment(plan, pointers).run()")


@dataclass(frozen=True, eq=False)
class DatasetPointer:
    """A remote dataset: its node, its published metadata, and the client to reach the node."""

    node: str
    url: str
    info: DatasetInfo
    client: NodeClient

    @property
    def name(self) -> str:
        return self.info.name

    def row(self) -> dict:
        i = self.info
        return {"node": self.node, "dataset": i.name, "tags": " ".join(i.tags), "volumes": i.volumes,
                "labels": ", ".join(i.label_names[1:]), "splits": " / ".join(f"{k} {v}" for k, v in i.splits.items()),
                "shape": _range(i.shape_range, str), "spacing (mm)": _range(i.spacing_range, "{:g}".format)}

    def get(self):
        """Always refused: asks the node (which refuses and audits the request) and raises AccessRefused."""
        self.client.request_data(self.info.name)
        raise AccessRefused(self.url, 403, "Forbidden", _REFUSED.format(ds=self.name, node=self.node))

    def _refuse(self, *_, **__):
        raise PermissionError(_REFUSED.format(ds=self.name, node=self.node))

    # Every way numpy, torch or Python would try to read the contents is refused the same way.
    __array__ = __iter__ = __getitem__ = __len__ = numpy = tolist = _refuse

    def __repr__(self) -> str:
        r = self.row()
        return f"<DatasetPointer {r['dataset']}@{r['node']} {r['tags']} volumes={r['volumes']} labels=[{r['labels']}]>"


class PointerList(list):
    """Search results: a list of :class:`DatasetPointer` that shows itself as a table."""

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([p.row() for p in self], columns=list(_COLUMNS))

    def __repr__(self) -> str:
        if not self:
            return "(no datasets found)"
        rows = [{k: str(v) for k, v in p.row().items()} for p in self]
        widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in _COLUMNS}
        line = "  ".join(c.ljust(widths[c]) for c in _COLUMNS)
        body = ["  ".join(r[c].ljust(widths[c]) for c in _COLUMNS) for r in rows]
        return "\n".join([line, "-" * len(line), *body])

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in p.row().values()) + "</tr>"
                       for p in self)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Grid:
    """The scientist's entry point, returned by :func:`voxgrid.connect`."""

    def __init__(self, grid: GridClient | None, token: str, ca, nodes: dict[str, str] | None = None,
                 tokens: dict[str, str] | None = None, timeout: float = 120.0):
        self._grid, self._token, self._ca, self._timeout = grid, token, ca, timeout
        self._static = dict(nodes or {})
        self._tokens = dict(tokens or {})
        self._clients: dict[str, NodeClient] = {}

    def node(self, name: str, url: str, connect: str = "direct") -> NodeClient:
        """The client for one node (tokens per node may differ; the connect token is the default). A node in
        outbound mode (``connect="outbound"``) is reached through the grid's relay."""
        key = f"{name}@{url}"
        if key not in self._clients:
            via = None
            if connect == "outbound":
                if self._grid is None:
                    raise ValueError(f"node {name} is reached through a grid's relay: connect to the grid")
                via = Relayed(self._grid.url, self._token)
            self._clients[key] = NodeClient(url, self._tokens.get(name, self._token), self._ca, self._timeout, via)
        return self._clients[key]

    def _listing(self) -> list[tuple[str, str, DatasetInfo]]:
        """(node, url, dataset) for every dataset on the directly given node URLs."""
        out = []
        for url in self._static.values():
            info = self.node(url, url).info()
            out.extend((info.name, url, d) for d in info.datasets)
        return out

    def search(self, *tags: str) -> PointerList:
        """Datasets carrying all ``tags`` (e.g. ``grid.search("#ct", "#pancreas")``)."""
        wanted = {normalise_tag(t) for t in tags}
        if self._grid is not None:
            found = [(r.node, r.url, r.dataset, r.connect) for r in self._grid.search(*sorted(wanted)).results]
        else:
            found = [(*t, "direct") for t in self._listing() if wanted <= set(t[2].tags)]
        return PointerList(DatasetPointer(n, u, d, self.node(n, u, c)) for n, u, d, c in found)

    def datasets(self) -> PointerList:
        return self.search()

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        if self._grid is not None:
            self._grid.close()

    def __repr__(self) -> str:
        where = self._grid.url if self._grid else f"{len(self._static)} node URLs"
        return f"<voxgrid Grid {where}>"
