"""The grid: a directory of nodes. Nodes register their published metadata; scientists search by tag."""


from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query

import voxgrid
from urllib.parse import urlsplit

from voxgrid.wire import API_PREFIX, Health, LinkStatus, NodeInfo, NodeRegistration, SearchResponse, SearchResult, \
    WhoAmI, normalise_tag

from voxgrid.nodes.service.db import Database, now
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.http.problems import ERRORS, caller_dependency, install_problem_handlers
from voxgrid.client import grid_credential
from voxgrid.nodes.http.relay import Relay
from voxgrid.nodes.service.node import Caller, Forbidden, Invalid, Unauthorized, authenticate, require

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    registered_at TEXT NOT NULL
);
"""


class GridService:
    def __init__(self, home: Home):
        self.home = home
        self.config = home.load()
        self.db = Database(Path(home.db_file), SCHEMA, issue_as=grid_credential)
        self.relay = Relay(self._relay_caller, self.node_at)

    def close(self) -> None:
        self.db.close()

    def authenticate(self, token: str | None) -> Caller:
        return authenticate(self.db, token)

    require = staticmethod(require)

    def _relay_caller(self, token: str | None) -> tuple[str, str] | None:
        try:
            caller = self.authenticate(token)
        except Unauthorized:
            return None
        return caller.name, caller.role

    def node_at(self, authority: str) -> str | None:
        """The outbound node registered at ``host:port`` (its URL's authority), if any."""
        for info in self._registered():
            if info.connect == "outbound" and _authority(info.url) == authority.lower():
                return info.name
        return None

    def _registered(self) -> list[NodeInfo]:
        return [NodeInfo.model_validate_json(r["info"]) for r in self.db.query("SELECT info FROM nodes ORDER BY name")]

    def links(self, caller: Caller) -> list[LinkStatus]:
        """The outbound nodes connected now (grid owner only)."""
        self.require(caller, "owner")
        return [LinkStatus(**vars(s)) for s in self.relay.status()]

    def register(self, caller: Caller, reg: NodeRegistration) -> NodeInfo:
        """A node (re)registers; its grid token's name must be the node's name, so none can pose as another."""
        self.require(caller, "node")
        if reg.info.name != caller.name:
            raise Forbidden(f"token for node {caller.name!r} cannot register node {reg.info.name!r}")
        if not reg.info.url.startswith("https://"):
            raise Invalid(f"node URL must be https://, got {reg.info.url!r}")
        taken = [i.name for i in self._registered()
                 if i.name != reg.info.name and _authority(i.url) == _authority(reg.info.url)]
        if taken:  # the relay finds an outbound node by its URL: one URL, one node
            raise Invalid(f"node URL {reg.info.url} is already registered by node {taken[0]!r}")
        with self.db.transaction() as c:
            c.execute("INSERT OR REPLACE INTO nodes VALUES (?,?,?)", (reg.info.name, reg.info.model_dump_json(), now()))
        self.db.audit(caller.name, "node.register", f"{reg.info.url}, {len(reg.info.datasets)} datasets")
        return reg.info

    def nodes(self, caller: Caller) -> list[NodeInfo]:
        self.require(caller, "scientist", "owner")
        return self._registered()

    def search(self, caller: Caller, tags: list[str]) -> SearchResponse:
        """Datasets carrying every one of ``tags`` (all datasets when none are given)."""
        self.require(caller, "scientist", "owner")
        try:
            wanted = {normalise_tag(t) for t in tags}
        except ValueError as exc:
            raise Invalid(str(exc)) from exc
        results = [SearchResult(node=n.name, url=n.url, dataset=d, connect=n.connect)
                   for n in self.nodes(caller) for d in n.datasets if wanted <= set(d.tags)]
        return SearchResponse(results=results)


def create_grid_app(service: GridService) -> FastAPI:
    # Like a node's: no public docs; the schema is at GET /v1/openapi.json for authenticated callers.
    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.relay.close()  # links and tunnels are the relay's, not uvicorn's: end them with the server

    app = FastAPI(title=f"voxgrid grid {service.config.name}", version=voxgrid.__version__, responses=ERRORS,
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    install_problem_handlers(app, service.authenticate)  # every body is JSON: capped at http.JSON_BODY_LIMIT
    Who = caller_dependency(service.authenticate)
    p = API_PREFIX

    @app.get(f"{p}/health", response_model=Health)
    async def health(c: Who):
        return Health(name=service.config.name, version=voxgrid.__version__)

    @app.get(f"{p}/whoami", response_model=WhoAmI)
    async def whoami(c: Who):
        return WhoAmI(name=c.name, role=c.role)

    @app.post(f"{p}/nodes", response_model=NodeInfo)
    def register(reg: NodeRegistration, c: Who):
        return service.register(c, reg)

    @app.get(f"{p}/nodes", response_model=list[NodeInfo])
    def nodes(c: Who):
        return service.nodes(c)

    @app.get(f"{p}/links", response_model=list[LinkStatus])
    def links(c: Who):
        return service.links(c)

    @app.get(f"{p}/search", response_model=SearchResponse)
    def search(c: Who, tag: Annotated[list[str] | None, Query()] = None):
        return service.search(c, tag or [])

    return app


def _authority(url: str) -> str:
    """``https://Node-A.example:443/x`` -> ``node-a.example:443`` (the port made explicit)."""
    parts = urlsplit(url)
    return f"{(parts.hostname or '').lower()}:{parts.port or 443}"
