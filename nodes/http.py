"""HTTP plumbing shared by the node and grid apps: typed problem responses, bearer tokens, body limits."""

from __future__ import annotations

import logging

from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from voxgrid.wire import MAX_BODY_BYTES, Problem

from .service import Caller, ServiceError, TooLarge, redact

log = logging.getLogger("voxgrid.http")


def problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse(Problem(title=title, status=status, detail=detail).model_dump(), status_code=status,
                        media_type="application/problem+json")


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError):
        return problem(exc.status, exc.title, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:10]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return problem(422, "Invalid request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return problem(exc.status_code, "HTTP error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception):
        log.exception("unhandled error")
        return problem(500, "Internal error", redact(f"{type(exc).__name__}: {exc}"))

    @app.middleware("http")
    async def _limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return problem(413, "Request too large", f"body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}")
        return await call_next(request)


def caller_dependency(authenticate):
    """``Annotated[Caller, Depends(...)]`` for routes: the caller named by the request's bearer token."""

    def caller(request: Request) -> Caller:
        return authenticate(bearer(request))

    return Annotated[Caller, Depends(caller)]


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused past ``limit`` even when the client sent no Content-Length (chunked)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
