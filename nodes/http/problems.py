"""HTTP plumbing shared by the node and grid apps: typed problem responses, bearer tokens, body limits.

:class:`Guard` is a pure ASGI middleware in front of every route. It authenticates the bearer token
before a single byte of the body is read (FastAPI parses a JSON body before it resolves
dependencies), caps every body as it arrives whether or not the client declared a Content-Length,
and bounds how many requests one non-owner caller has in flight, so the owner's routes keep answering.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Annotated, Callable

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from voxgrid.wire import MAX_BODY_BYTES, API_PREFIX, Problem

from voxgrid.nodes.service.node import Caller, ServiceError, TooLarge, redact

log = logging.getLogger("voxgrid.http")

#: Largest JSON body: a secure-aggregation roster of AdvertisedKeys is ~1.3 KB a node (a P-256
#: certificate and three short base64 fields), so 8 MiB holds thousands of nodes; a plan is a few KB.
JSON_BODY_LIMIT = 8 * 1024 * 1024
#: Requests one non-owner caller may have in flight at once; more wait (holding no thread) in :class:`Guard`.
MAX_INFLIGHT_PER_CALLER = 8
PROBLEM = "application/problem+json"
ERROR_STATUSES = (400, 401, 403, 404, 405, 413, 422, 429, 500)


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(Problem(title=title, status=status, detail=detail).model_dump(), status_code=status,
                        media_type=PROBLEM, headers=headers)


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTPExceptions met while it reads a body."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class Guard:
    """Authenticate first, cap every body, bound each non-owner caller's concurrent requests.

    ``limits`` maps ``(method, path)`` to a body limit for the routes that take big bodies (weights);
    every other request may send at most ``JSON_BODY_LIMIT`` bytes. ``unbounded`` names requests
    exempt from the in-flight bound (long-polls, which hold no thread and are bounded by the service).
    """

    def __init__(self, app, authenticate: Callable[[str | None], Caller],
                 limits: dict[tuple[str, str], int] | None = None,
                 unbounded: Callable[[dict], bool] = lambda scope: False, per_caller: int = MAX_INFLIGHT_PER_CALLER):
        self.app, self.authenticate, self.limits = app, authenticate, limits or {}
        self.unbounded, self.per_caller = unbounded, per_caller
        self._slots: dict[Caller, asyncio.Semaphore] = {}
        # Token checks (a SQLite read) run on their own threads: busy routes never delay authentication.
        self._auth_limiter = anyio.CapacityLimiter(8)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        token = _bearer(headers.get("authorization", ""))
        try:
            caller = await anyio.to_thread.run_sync(self.authenticate, token, limiter=self._auth_limiter)
        except ServiceError as exc:
            refusal = problem(exc.status, exc.title, exc.detail, {"WWW-Authenticate": "Bearer"})
            return await refusal(scope, receive, send)
        scope.setdefault("state", {})["caller"] = caller
        limit = self.limits.get((scope["method"], scope["path"]), JSON_BODY_LIMIT)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await problem(413, "Request too large", f"body of {length} bytes exceeds the limit of {limit}")(
                scope, receive, send)
        received = 0

        async def capped():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        if caller.role == "owner" or self.unbounded(scope):
            return await self.app(scope, capped, send)
        slots = self._slots.setdefault(caller, asyncio.Semaphore(self.per_caller))
        async with slots:
            await self.app(scope, capped, send)


def install_problem_handlers(app: FastAPI, authenticate: Callable[[str | None], Caller], *,
                             limits: dict[tuple[str, str], int] | None = None,
                             unbounded: Callable[[dict], bool] = lambda scope: False) -> None:
    """Problem+json errors, :class:`Guard`, the schema behind a token (no public docs, no CDN)."""

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError):
        retry = getattr(exc, "retry_after", None)
        return problem(exc.status, exc.title, exc.detail, {"Retry-After": str(retry)} if retry else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:10]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return problem(422, "Invalid request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        titles = {404: "Not found", 405: "Method not allowed", 413: "Request too large"}
        title = titles.get(exc.status_code, "HTTP error")
        return problem(exc.status_code, title, str(exc.detail), exc.headers)  # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception):
        log.exception("unhandled error")
        return problem(500, "Internal error", redact(f"{type(exc).__name__}: {exc}"))

    app.add_middleware(Guard, authenticate=authenticate, limits=limits, unbounded=unbounded)

    @app.get(f"{API_PREFIX}/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        """The API schema, for authenticated callers only (the public /docs, /redoc, /openapi.json are off)."""
        return JSONResponse(problem_schema(app))


def problem_schema(app: FastAPI) -> dict:
    """``app.openapi()`` with every error documented as ``application/problem+json`` (as it is sent)."""
    if app.openapi_schema is None:
        schema = app.openapi()
        for path in schema.get("paths", {}).values():
            for op in path.values():
                for code, resp in op.get("responses", {}).items():
                    if code[0] in "45" and "application/json" in resp.get("content", {}):
                        resp["content"] = {PROBLEM: resp["content"]["application/json"]}
        comps = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            comps.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


#: The error responses every route documents (the Problem model, sent as application/problem+json).
ERRORS = {code: {"model": Problem} for code in ERROR_STATUSES}


def caller_dependency(authenticate):
    """``Annotated[Caller, Depends(...)]`` for routes: the caller named by the request's bearer token
    (already checked by :class:`Guard`; checked here again when a transport calls without it)."""

    async def caller(request: Request) -> Caller:
        found = request.scope.get("state", {}).get("caller")
        return found if found is not None else authenticate(bearer(request))

    return Annotated[Caller, Depends(caller)]


def _bearer(auth: str) -> str | None:
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def bearer(request: Request) -> str | None:
    return _bearer(request.headers.get("authorization", ""))


def job_long_poll(scope: dict) -> bool:
    """GET /v1/jobs/{id}: a long-poll that holds no thread (bounded per caller by the service)."""
    return scope["method"] == "GET" and _JOB_RE.match(scope["path"]) is not None


_JOB_RE = re.compile(rf"^{re.escape(API_PREFIX)}/jobs/[^/]+$")


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused past ``limit`` even when the client sent no Content-Length (chunked)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
