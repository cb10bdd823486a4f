"""HTTPS routes of a data node: thin adapters over :class:`~voxgrid.nodes.service.node.NodeService`."""

import asyncio
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Query, Request, Response
from starlette.concurrency import run_in_threadpool

import voxgrid
from voxgrid.privacy import BudgetStatus
from voxgrid.wire import (API_PREFIX, MAX_BODY_BYTES, AdvertisedKeys, AuditEntry, BudgetSet, DatasetInfo,
                          EncryptedShare, Estimate, EstimateRequest, Health, JobRequest, JobStatus, LedgerView,
                          NodeInfo, Problem, RevealedShare, RevealRequest, SecAggKeysRequest, SecAggMaskedRequest,
                          SecAggSharesRequest, TokenInfo, TokenIssue, TokenIssued, WeightsRef, WhoAmI)

from voxgrid.wire import ApprovalDecision, ApprovalRequestCreate, ApprovalRequestInfo, PolicyInfo, PolicySet

from voxgrid.nodes.http.problems import ERRORS, caller_dependency, install_problem_handlers, job_long_poll, read_body
from voxgrid.nodes.service.node import NodeService

OCTETS = "application/octet-stream"
#: Weights uploads read at once, node-wide and per caller: each holds its body (up to 512 MiB) and the
#: parsed tensors in memory, so eight parallel uploads of one scientist once meant 8 GB.
MAX_UPLOADS, MAX_UPLOADS_PER_CALLER = 4, 1


class UploadSlots:
    """Bounds concurrent uploads; a caller's further uploads wait their turn, holding no body."""

    def __init__(self):
        self._all = asyncio.Semaphore(MAX_UPLOADS)
        self._mine: dict[str, asyncio.Semaphore] = {}

    @asynccontextmanager
    async def slot(self, caller):
        mine = self._mine.setdefault(caller.name, asyncio.Semaphore(MAX_UPLOADS_PER_CALLER))
        async with mine, self._all:
            yield


OCTET_RESPONSE = {200: {"content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}}}}


def create_app(service: NodeService) -> FastAPI:
    # No public docs: the schema is served to authenticated callers at GET /v1/openapi.json, and no
    # page pulls scripts from a CDN that a hospital network blocks.
    app = FastAPI(title=f"voxgrid data node {service.config.name}", version=voxgrid.__version__, responses=ERRORS,
                  docs_url=None, redoc_url=None, openapi_url=None)
    # Only the weights upload may be big; every JSON body is capped at http.JSON_BODY_LIMIT.
    install_problem_handlers(app, service.authenticate, limits={("PUT", f"{API_PREFIX}/weights"): MAX_BODY_BYTES},
                             unbounded=job_long_poll)
    Who = caller_dependency(service.authenticate)
    # Every route only adapts HTTP to one NodeService method; roles are checked there, for every transport.
    for routes in (_metadata_routes, _job_routes, _secagg_routes, _owner_routes, _approval_routes):
        routes(app, service, Who)
    return app


def _metadata_routes(app: FastAPI, service: NodeService, Who) -> None:
    p = API_PREFIX

    @app.get(f"{p}/health", response_model=Health)
    async def health(c: Who):  # no thread: answers even when every worker thread is busy
        return service.health(c)

    @app.get(f"{p}/whoami", response_model=WhoAmI)
    async def whoami(c: Who):
        return service.whoami(c)

    @app.get(f"{p}/info", response_model=NodeInfo)
    def info(c: Who):
        return service.info(c)

    @app.get(f"{p}/datasets", response_model=list[DatasetInfo])
    def datasets(c: Who):
        return service.datasets(c)

    @app.get(f"{p}/datasets/{{name}}", response_model=DatasetInfo)
    def dataset(name: str, c: Who):
        return service.dataset(c, name)

    @app.get(f"{p}/datasets/{{name}}/data", responses={403: {"model": Problem}})
    def dataset_data(name: str, c: Who):
        service.dataset_data(c, name)

    @app.post(f"{p}/privacy/estimate", response_model=Estimate)
    def privacy_estimate(req: EstimateRequest, c: Who):
        return service.privacy_estimate(c, req)


def _job_routes(app: FastAPI, service: NodeService, Who) -> None:
    p = API_PREFIX
    uploads = UploadSlots()

    @app.put(f"{p}/weights", response_model=WeightsRef)
    async def put_weights(request: Request, c: Who):
        service.admit_upload(c)  # before the body is read or a slot is taken
        async with uploads.slot(c):
            data = await read_body(request)
            return await run_in_threadpool(service.put_weights, c, data)  # hashing 512 MiB must not stall the loop

    @app.post(f"{p}/jobs", response_model=JobStatus)
    def submit(req: JobRequest, c: Who):
        return service.submit(c, req)

    @app.get(f"{p}/jobs/{{job_id}}", response_model=JobStatus)
    async def job_status(job_id: str, c: Who, wait: Annotated[float, Query(ge=0, le=60)] = 0.0):
        # Waits on an event, holding no thread; past a caller's bound of waits: 429 with Retry-After.
        return await service.job_status_wait(c, job_id, wait)

    @app.delete(f"{p}/jobs/{{job_id}}", response_model=JobStatus)
    def cancel_job(job_id: str, c: Who):
        return service.cancel_job(c, job_id)

    @app.get(f"{p}/jobs/{{job_id}}/update", response_class=Response, responses=OCTET_RESPONSE)
    def job_update(job_id: str, c: Who):
        return Response(service.job_update(c, job_id), media_type=OCTETS)


def _secagg_routes(app: FastAPI, service: NodeService, Who) -> None:
    p = API_PREFIX

    @app.post(f"{p}/secagg/keys", response_model=AdvertisedKeys)
    def secagg_keys(req: SecAggKeysRequest, c: Who):
        return service.secagg_keys(c, req)

    @app.post(f"{p}/secagg/shares", response_model=list[EncryptedShare])
    def secagg_shares(req: SecAggSharesRequest, c: Who):
        return service.secagg_shares(c, req)

    @app.post(f"{p}/secagg/masked", response_class=Response, responses=OCTET_RESPONSE)
    def secagg_masked(req: SecAggMaskedRequest, c: Who):
        return Response(service.secagg_masked(c, req), media_type=OCTETS)

    @app.post(f"{p}/secagg/reveal", response_model=list[RevealedShare])
    def secagg_reveal(req: RevealRequest, c: Who):
        return service.secagg_reveal(c, req)


def _owner_routes(app: FastAPI, service: NodeService, Who) -> None:
    p = API_PREFIX

    @app.post(f"{p}/owner/tokens", response_model=TokenIssued)
    def issue_token(req: TokenIssue, c: Who):
        return service.issue_token(c, req)

    @app.get(f"{p}/owner/tokens", response_model=list[TokenInfo])
    def tokens(c: Who):
        return service.tokens(c)

    @app.delete(f"{p}/owner/tokens/{{token_id}}", response_model=TokenInfo)
    def revoke_token(token_id: str, c: Who):
        return service.revoke_token(c, token_id)

    @app.get(f"{p}/owner/audit", response_model=list[AuditEntry])
    def audit(c: Who, limit: Annotated[int, Query(ge=1, le=10000)] = 200):
        return service.audit_log(c, limit)

    @app.get(f"{p}/owner/jobs", response_model=list[JobStatus])
    def jobs(c: Who):
        return service.jobs(c)

    @app.post(f"{p}/owner/budgets", response_model=list[BudgetStatus])
    def set_budget(req: BudgetSet, c: Who):
        return service.set_budget(c, req)

    @app.get(f"{p}/owner/ledger", response_model=LedgerView)
    def ledger(c: Who):
        return service.ledger_view(c)


def _approval_routes(app: FastAPI, service: NodeService, Who) -> None:
    """The owner decides (nodes/service/approvals.py): a scientist's requests, the owner's decisions."""
    p, approvals = API_PREFIX, service.approvals
    conflict = {409: {"model": Problem}}

    @app.post(f"{p}/requests", response_model=ApprovalRequestInfo)
    def create_request(req: ApprovalRequestCreate, c: Who):
        return approvals.create(c, req)

    @app.get(f"{p}/requests", response_model=list[ApprovalRequestInfo])
    def my_requests(c: Who):
        return approvals.mine(c)

    @app.get(f"{p}/requests/{{request_id}}", response_model=ApprovalRequestInfo)
    def my_request(request_id: str, c: Who):
        return approvals.get(c, request_id)

    @app.get(f"{p}/owner/requests", response_model=list[ApprovalRequestInfo])
    def requests(c: Who, state: str | None = None):
        return approvals.requests(c, state)

    @app.get(f"{p}/owner/policies", response_model=list[PolicyInfo])
    def policies(c: Who):
        return approvals.policies(c)

    @app.put(f"{p}/owner/policies/{{dataset}}", response_model=PolicyInfo)
    def set_policy(dataset: str, req: PolicySet, c: Who):
        return approvals.set_policy(c, dataset, req.policy, req.rules)

    @app.post(f"{p}/owner/requests/{{request_id}}/approve", response_model=ApprovalRequestInfo, responses=conflict)
    def approve(request_id: str, d: ApprovalDecision, c: Who):
        return approvals.approve(c, request_id, d.releases, d.days)

    @app.post(f"{p}/owner/requests/{{request_id}}/deny", response_model=ApprovalRequestInfo, responses=conflict)
    def deny(request_id: str, d: ApprovalDecision, c: Who):
        return approvals.deny(c, request_id, d.reason or "")

    @app.post(f"{p}/owner/requests/{{request_id}}/revoke", response_model=ApprovalRequestInfo, responses=conflict)
    def revoke(request_id: str, d: ApprovalDecision, c: Who):
        return service.revoke_approval(c, request_id, d.reason)
