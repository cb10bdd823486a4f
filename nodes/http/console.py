"""The owner console: web pages the node serves to its owner, on a port of its own (loopback by default).

Server-rendered (Jinja2 templates in ``templates/console/``), no scripts, nothing fetched from elsewhere.
Every action calls the same service method as the CLI and the owner API (so the audit log reads the same);
reading pages too goes through the service, with the caller the owner token gives. Sessions and CSRF
checks: :mod:`.console_sessions`. Pages: pending requests and one request (plan, diff, hash, projected
cost; approve, deny, revoke), policies, budgets, tokens, the audit log, the privacy report (the same
content as ``voxgrid privacy report`` writes, from :func:`voxgrid.privacy.report.render_body`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from voxgrid.privacy import report as privacy_report

from voxgrid.nodes.http import console_views as views
from voxgrid.nodes.http.console_sessions import COOKIE, Session, Sessions, csrf_ok, same_origin
from voxgrid.nodes.service.node import Caller, NodeService, ServiceError, Unauthorized

TEMPLATES = Path(__file__).parent / "templates" / "console"
MAX_FORM_BYTES = 16 * 1024
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# No scripts at all; styles only inline (the report's SVG charts carry their own); forms post only here.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",  # not no-referrer: that would make browsers send 'Origin: null'
}


class ConsoleError(Exception):
    """An error page: ``status``, a title and what went wrong in words."""

    def __init__(self, status: int, title: str, detail: str):
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


class NotLoggedIn(Exception):
    """A page asked for without a live session: the login page instead."""


@dataclass
class Owner:
    """The logged-in owner of one request: the session and the caller its token gives now."""

    session: Session
    caller: Caller


@dataclass
class Posted:
    """A form that passed the checks: its owner and its fields (empty ones left out)."""

    owner: Owner
    form: dict[str, str]


class Console:
    """The console's state: the node's service, its sessions, the templates."""

    def __init__(self, service: NodeService, allowed_hosts: set[str]):
        self.service, self.allowed_hosts = service, allowed_hosts
        self.sessions = Sessions()
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                      undefined=jinja2.StrictUndefined)
        self.css = privacy_report.CSS + (TEMPLATES / "console.css").read_text()

    def page(self, name: str, session: Session | None = None, status: int = 200, **ctx) -> HTMLResponse:
        body = self.env.get_template(name).render(
            css=self.css, node=self.service.config.name, here=name.removesuffix(".html"),
            session=session if session and session.token else None,
            csrf=session.csrf if session else "", flash=session.pop_flash() if session else None, **ctx)
        return HTMLResponse(body, status_code=status)

    def owner(self, request: Request) -> Owner:
        """The owner behind this request's session (its token checked again now), or NotLoggedIn."""
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None or session.token is None:
            raise NotLoggedIn()
        try:
            caller = self.service.authenticate(session.token)
        except Unauthorized:  # revoked or expired since the login: the session ends with it
            self.sessions.drop(session.sid)
            raise NotLoggedIn() from None
        if caller.role != "owner":
            self.sessions.drop(session.sid)
            raise NotLoggedIn()
        return Owner(session, caller)

    async def checked_form(self, request: Request) -> tuple[Session | None, dict[str, str]]:
        """The form of a POST that comes from a page of this console and carries the session's CSRF token."""
        why = same_origin(request.headers, self.allowed_hosts)
        if why is not None:
            raise ConsoleError(403, "Cross-site request refused", f"This form was not sent from the console: {why}. "
                                                                  "Nothing was changed.")
        form = await read_form(request)
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            raise ConsoleError(401, "Not logged in", "Your session has ended or never began; log in again. "
                                                     "Nothing was changed.")
        if not csrf_ok(session, form.pop("csrf", None)):
            raise ConsoleError(403, "Form check failed", "The form's CSRF token is missing or wrong (an old tab, or "
                                                         "a form from another site). Nothing was changed.")
        return session, {k: v for k, v in form.items() if v != ""}

    def posted(self):
        """A dependency: the checked form of a logged-in owner."""
        async def dep(request: Request) -> Posted:
            session, form = await self.checked_form(request)
            if session.token is None:
                raise ConsoleError(401, "Not logged in", "Log in first. Nothing was changed.")
            try:
                return Posted(self.owner(request), form)
            except NotLoggedIn:
                raise ConsoleError(401, "Not logged in", "Your owner token is no longer valid (revoked or expired); "
                                                         "log in again. Nothing was changed.") from None
        return dep


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (what the console's forms send; nothing else is taken),
    at most :data:`MAX_FORM_BYTES`, as {field: value stripped}; a field given twice keeps its last value."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise ConsoleError(415, "Not a form", f"expected a form (application/x-www-form-urlencoded), got {kind or 'none'}"
                                              ". Nothing was changed.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise ConsoleError(413, "Form too large", f"a console form is at most {MAX_FORM_BYTES} bytes. "
                                                      "Nothing was changed.")
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=64, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConsoleError(400, "Malformed form", f"{exc}. Nothing was changed.") from None
    return {k: v.strip() for k, v in pairs}


def parse(model: type[BaseModel], form: dict[str, str]):
    """A form's fields as ``model`` (422 error page naming each bad field)."""
    try:
        return model.model_validate(form)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'form'}: {e['msg']}" for e in exc.errors())
        raise ConsoleError(422, "Invalid form", f"{detail}. Nothing was changed.") from None


def see_other(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


def allowed_hosts(service: NodeService) -> set[str]:
    """Host names the console answers to: loopback, its listen address, the node's host and public name."""
    from urllib.parse import urlsplit

    cfg = service.config
    names = {cfg.console_host, cfg.host, urlsplit(cfg.public_url or "").hostname or ""}
    return (LOOPBACK | names) - {"", "0.0.0.0", "::"}


def create_console_app(service: NodeService, hosts: set[str] | None = None) -> FastAPI:
    """The console's ASGI app for ``service`` (serve it over HTTPS: its cookie is Secure)."""
    app = FastAPI(title=f"voxgrid owner console {service.config.name}", docs_url=None, redoc_url=None,
                  openapi_url=None)
    console = Console(service, hosts if hosts is not None else allowed_hosts(service))
    app.state.console = console

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    _error_handlers(app, console)
    from voxgrid.nodes.http.console_routes import add_routes

    add_routes(app, console, Depends(console.owner), Depends(console.posted()))
    return app


def _error_handlers(app: FastAPI, console: Console) -> None:
    def error_page(request: Request, status: int, title: str, detail: str) -> Response:
        session = console.sessions.get(request.cookies.get(COOKIE))
        return console.page("error.html", session, status, title=title, detail=detail, code=status)

    @app.exception_handler(NotLoggedIn)
    async def login_first(request: Request, exc: NotLoggedIn):
        return see_other("/login?next=" + views.local_path(request.url.path))

    @app.exception_handler(ConsoleError)
    async def console_error(request: Request, exc: ConsoleError):
        return error_page(request, exc.status, exc.title, exc.detail)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        changed = " Nothing was changed." if request.method == "POST" else ""
        return error_page(request, exc.status, exc.title, f"{exc.detail.rstrip('.')}.{changed}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        words = "No such page" if exc.status_code == 404 else "Request refused"
        return error_page(request, exc.status_code, words, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_page(request, 422, "Invalid request", detail)
