"""Clients for nodes and the grid. Every call the scientist's side makes to a node goes through
:class:`NodeClient`, so another transport can replace HTTPS without touching the experiment."""

from __future__ import annotations

import hashlib
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import BaseModel, TypeAdapter

from voxgrid.pki import client_ssl_context
from voxgrid.privacy import BudgetStatus
from voxgrid.wire import ApprovalDecision, ApprovalRequestCreate, ApprovalRequestInfo, PolicyInfo, PolicyRules, PolicySet
from voxgrid.wire import (API_PREFIX, AdvertisedKeys, AuditEntry, BudgetSet, DatasetInfo, EncryptedShare, Estimate,
                          EstimateRequest, Health, JobRequest, LinkStatus, JobStatus, LedgerView, NodeInfo, NodeRegistration,
                          Problem, RevealedShare, RevealRequest, SearchResponse, SecAggKeysRequest, SecAggMaskedRequest,
                          SecAggSharesRequest, TokenInfo, TokenIssue, TokenIssued, WeightsRef, WhoAmI)


class VoxgridError(Exception):
    """Base class of every error the scientist's side raises."""


class RemoteError(VoxgridError):
    """A node or the grid answered with a problem. ``status`` is the HTTP status."""

    def __init__(self, url: str, status: int, title: str, detail: str):
        super().__init__(f"{url}: {title} ({status}): {detail}")
        self.url, self.status, self.title, self.detail = url, status, title, detail


class AuthError(RemoteError):
    """401: missing, unknown or revoked token."""


class AccessRefused(RemoteError, PermissionError):
    """403: the caller's role may not do this, or the data never leaves the node."""


class NotFoundError(RemoteError, LookupError):
    """404: no such dataset or job."""


class RequestRefused(RemoteError, ValueError):
    """413/422: the request (a plan, a job, weights) was refused as invalid."""


class TooManyRequests(RemoteError):
    """429: the caller has too many long-polls waiting at the node; ``retry_after`` seconds is a fair pause."""

    retry_after: float = 1.0


class ConflictError(RemoteError):
    """409: the request is not in a state that allows this (approving twice, denying an approved request)."""


class Unreachable(VoxgridError, ConnectionError):
    """The server could not be reached (down, wrong address, TLS failure)."""


_ERRORS = {401: AuthError, 403: AccessRefused, 404: NotFoundError, 413: RequestRefused, 422: RequestRefused,
           429: TooManyRequests}
_ERRORS[409] = ConflictError


def _verify(ca: str | Path | ssl.SSLContext | None) -> ssl.SSLContext | bool:
    if isinstance(ca, ssl.SSLContext):
        return ca
    if ca is None:
        return True  # system trust store; a federation normally passes its own CA
    return client_ssl_context(Path(ca))


GRID_CREDENTIAL_PREFIX = "vxgc_"


def grid_credential(token: str) -> str:
    """What a token holder sends to the grid instead of the token: a one-way derivative of it.

    Why: the grid relays scientists to outbound nodes, and the same token is often valid at the nodes
    too; the grid stores and checks only this derivative, so it never holds a token a node accepts."""
    return GRID_CREDENTIAL_PREFIX + hashlib.sha256(b"voxgrid grid credential\0" + token.encode()).hexdigest()


@dataclass(frozen=True)
class Relayed:
    """The way to a node in outbound mode: through its grid's relay, with the scientist's grid token.

    The relay is an HTTP ``CONNECT`` proxy at the grid: the TLS session inside the tunnel is the
    scientist's with the node itself, checked against the CA and the node's host name as in direct mode."""

    grid_url: str
    grid_token: str

    def proxy(self, verify: ssl.SSLContext | bool) -> httpx.Proxy:
        context = verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context()
        return httpx.Proxy(self.grid_url, ssl_context=context,
                           headers={"Proxy-Authorization": f"Bearer {grid_credential(self.grid_token)}"})


class _Client:
    """Typed calls over HTTPS; ``via`` reaches the server through a relay (or a proxy) instead of directly."""

    def __init__(self, url: str, token: str, ca=None, timeout: float = 120.0,
                 via: Relayed | httpx.Proxy | str | None = None, uds: str | None = None):
        self.url = url.rstrip("/")
        verify = _verify(ca)
        proxy = via.proxy(verify) if isinstance(via, Relayed) else via
        self._relayed = isinstance(via, Relayed)
        # uds: a node in outbound mode serves its own machine on a private Unix socket (its owner's tools)
        transport = httpx.HTTPTransport(verify=verify, uds=uds) if uds else None
        self._http = httpx.Client(base_url=self.url + API_PREFIX, verify=verify, timeout=timeout, proxy=proxy,
                                  transport=transport, headers={"Authorization": f"Bearer {token}"})

    @property
    def relayed(self) -> bool:
        """Whether calls go through the grid's relay (the server is in outbound mode)."""
        return self._relayed

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, path: str, model=None, **kw):
        try:
            r = self._http.request(method, path, **kw)
        except httpx.ProxyError as exc:
            raise Unreachable(f"{self.url}: the relay at the grid refused the tunnel: {exc}") from exc
        except httpx.TransportError as exc:
            if self._relayed:  # the session is end to end: anything the relay changes breaks it, loudly
                raise Unreachable(f"{self.url}: the TLS session with the node through the grid's relay failed "
                                  f"(the link broke, or the relay altered, replayed or misrouted it): "
                                  f"{type(exc).__name__}: {exc}") from exc
            raise Unreachable(f"{self.url}: cannot reach server: {exc}") from exc
        if r.status_code >= 400:
            try:
                p = Problem.model_validate_json(r.content)
                title, detail = p.title, p.detail
            except ValueError:
                title, detail = r.reason_phrase, r.text[:500]
            error = _ERRORS.get(r.status_code, RemoteError)(self.url, r.status_code, title, detail)
            if isinstance(error, TooManyRequests) and r.headers.get("retry-after", "").isdigit():
                error.retry_after = float(r.headers["retry-after"])
            raise error
        if model is None:
            return r.content
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate_json(r.content)
        return TypeAdapter(model).validate_json(r.content)

    def _post(self, path: str, body: BaseModel, model):
        return self._call("POST", path, model, content=body.model_dump_json(),
                          headers={"Content-Type": "application/json"})

    def health(self) -> Health:
        return self._call("GET", "/health", Health)

    def whoami(self) -> WhoAmI:
        return self._call("GET", "/whoami", WhoAmI)


class NodeClient(_Client):
    """The scientist's (and owner's) interface to one data node, reached directly (``via=None``) or, for a
    node in outbound mode, through its grid's relay (``via=Relayed(grid_url, grid_token)``)."""

    def info(self) -> NodeInfo:
        return self._call("GET", "/info", NodeInfo)

    def datasets(self) -> list[DatasetInfo]:
        return self._call("GET", "/datasets", list[DatasetInfo])

    def dataset(self, name: str) -> DatasetInfo:
        return self._call("GET", f"/datasets/{name}", DatasetInfo)

    def request_data(self, name: str) -> bytes:
        """Ask for a dataset's voxels. Nodes always refuse (raises :class:`AccessRefused`)."""
        return self._call("GET", f"/datasets/{name}/data")

    def put_weights(self, blob: bytes) -> WeightsRef:
        return self._call("PUT", "/weights", WeightsRef, content=blob,
                          headers={"Content-Type": "application/octet-stream"})

    def submit(self, req: JobRequest) -> JobStatus:
        return self._post("/jobs", req, JobStatus)

    def job(self, job_id: str, wait: float = 0.0) -> JobStatus:
        """The job's status; with ``wait``, long-poll up to that many seconds for it to end. A node bounds
        each caller's concurrent long-polls: past the bound this pauses as the node asks, then polls."""
        try:
            return self._call("GET", f"/jobs/{job_id}", JobStatus, params={"wait": wait},
                              timeout=httpx.Timeout(self._http.timeout.read + wait) if wait else None)
        except TooManyRequests as exc:
            time.sleep(min(exc.retry_after, wait))
            return self._call("GET", f"/jobs/{job_id}", JobStatus, params={"wait": 0})

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued or running job (a scientist its own, the owner any); it ends failed with
        "cancelled by ..." as its error. A finished job is returned as it is."""
        return self._call("DELETE", f"/jobs/{job_id}", JobStatus)

    def update(self, job_id: str) -> bytes:
        return self._call("GET", f"/jobs/{job_id}/update")

    # secure aggregation: the four steps of a round (voxgrid.secure drives them) ---------------
    def secagg_keys(self, req: SecAggKeysRequest) -> AdvertisedKeys:
        return self._post("/secagg/keys", req, AdvertisedKeys)

    def secagg_shares(self, req: SecAggSharesRequest) -> list[EncryptedShare]:
        return self._post("/secagg/shares", req, list[EncryptedShare])

    def secagg_masked(self, req: SecAggMaskedRequest) -> bytes:
        return self._post("/secagg/masked", req, None)

    def secagg_reveal(self, req: RevealRequest) -> list[RevealedShare]:
        return self._post("/secagg/reveal", req, list[RevealedShare])

    def privacy_estimate(self, dataset: str, privacy: dict | None, releases: int = 1,
                         plan: dict | None = None) -> Estimate:
        """What ``releases`` more train jobs with the filter chain ``privacy`` would cost us on ``dataset``.

        ``plan`` (JSON): the plan the jobs would run; needed for DP-SGD, whose cost follows its schedule."""
        body = EstimateRequest(dataset=dataset, privacy=privacy, releases=releases, plan=plan)
        return self._post("/privacy/estimate", body, Estimate)

    # owner
    def issue_token(self, name: str, role: str = "scientist") -> TokenIssued:
        return self._post("/owner/tokens", TokenIssue(name=name, role=role), TokenIssued)

    def tokens(self) -> list[TokenInfo]:
        """The node's tokens: id, name, role, created, expires, revoked, expired (never a token or its hash)."""
        return self._call("GET", "/owner/tokens", list[TokenInfo])

    def revoke_token(self, token_id: str) -> TokenInfo:
        """Revoke the token ``token_id`` (an id :meth:`tokens` lists); the node refuses it from its next request."""
        return self._call("DELETE", f"/owner/tokens/{token_id}", TokenInfo)

    def audit(self, limit: int = 200) -> list[AuditEntry]:
        return self._call("GET", "/owner/audit", list[AuditEntry], params={"limit": limit})

    def jobs(self) -> list[JobStatus]:
        return self._call("GET", "/owner/jobs", list[JobStatus])

    def set_budget(self, dataset: str, epsilon: float, delta: float,
                   scientist: str | None = None) -> list[BudgetStatus]:
        """Set a privacy budget on a dataset (for one scientist, or everyone together); returns its budgets."""
        body = BudgetSet(dataset=dataset, scientist=scientist, epsilon=epsilon, delta=delta)
        return self._post("/owner/budgets", body, list[BudgetStatus])

    def ledger(self) -> LedgerView:
        """The node's privacy ledger: budgets, releases, refusals."""
        return self._call("GET", "/owner/ledger", LedgerView)

    # the owner decides: requests and approvals (nodes/service/approvals.py) -------------------------
    def request_approval(self, dataset: str, plan, plan_hash: str | None = None, *, releases: int | None = None,
                         purpose: str = "") -> ApprovalRequestInfo:
        """Ask the owner of ``dataset`` to approve ``plan`` (a :class:`voxgrid.plan.Plan`, or its JSON) for
        ``releases`` jobs; a pending request for the same plan is updated instead of repeated."""
        if hasattr(plan, "content_hash"):
            plan, plan_hash = plan.model_dump(mode="json"), plan.content_hash
        elif plan_hash is None:
            from voxgrid.plan import Plan

            plan_hash = Plan.model_validate(plan).content_hash
        body = ApprovalRequestCreate(dataset=dataset, plan=plan, plan_hash=plan_hash, releases=releases,
                                     purpose=purpose)
        return self._post("/requests", body, ApprovalRequestInfo)

    def requests(self) -> list[ApprovalRequestInfo]:
        """Our requests at this node, newest first, with their decisions."""
        return self._call("GET", "/requests", list[ApprovalRequestInfo])

    def request(self, request_id: str) -> ApprovalRequestInfo:
        """One request (ours; the owner: any, with the changes against the scientist's nearest approved plan)."""
        return self._call("GET", f"/requests/{request_id}", ApprovalRequestInfo)

    def owner_requests(self, state: str | None = None) -> list[ApprovalRequestInfo]:
        """Owner: every request at the node (or those in ``state``: pending, approved, denied, revoked)."""
        return self._call("GET", "/owner/requests", list[ApprovalRequestInfo],
                          params={"state": state} if state else None)

    def approve(self, request_id: str, releases: int | None = None, days: float | None = None) -> ApprovalRequestInfo:
        """Owner: approve a pending request for ``releases`` jobs during ``days`` (node default: 30)."""
        return self._post(f"/owner/requests/{request_id}/approve", ApprovalDecision(releases=releases, days=days),
                          ApprovalRequestInfo)

    def deny(self, request_id: str, reason: str) -> ApprovalRequestInfo:
        """Owner: deny a pending request; the scientist sees ``reason``."""
        return self._post(f"/owner/requests/{request_id}/deny", ApprovalDecision(reason=reason), ApprovalRequestInfo)

    def revoke_approval(self, request_id: str, reason: str | None = None) -> ApprovalRequestInfo:
        """Owner: revoke an approval; later jobs are refused, its queued and running jobs are stopped."""
        return self._post(f"/owner/requests/{request_id}/revoke", ApprovalDecision(reason=reason),
                          ApprovalRequestInfo)

    def policies(self) -> list[PolicyInfo]:
        """Owner: each dataset's policy (and a 'rules' one's rules)."""
        return self._call("GET", "/owner/policies", list[PolicyInfo])

    def set_policy(self, dataset: str, policy: str, rules: PolicyRules | None = None) -> PolicyInfo:
        """Owner: set a dataset's policy: 'open', 'review' or 'rules' (with ``rules``, else the defaults)."""
        return self._call("PUT", f"/owner/policies/{dataset}", PolicyInfo,
                          content=PolicySet(policy=policy, rules=rules).model_dump_json(),
                          headers={"Content-Type": "application/json"})


class GridClient(_Client):
    """The grid directory: search datasets by tag, list nodes. It sends the grid only
    :func:`grid_credential` of the token, never the token itself."""

    def __init__(self, url: str, token: str, ca=None, timeout: float = 120.0, via=None, uds: str | None = None):
        super().__init__(url, grid_credential(token), ca, timeout, via, uds)

    def search(self, *tags: str) -> SearchResponse:
        return self._call("GET", "/search", SearchResponse, params=[("tag", t) for t in tags])

    def nodes(self) -> list[NodeInfo]:
        return self._call("GET", "/nodes", list[NodeInfo])

    def register(self, info: NodeInfo) -> NodeInfo:
        return self._post("/nodes", NodeRegistration(info=info), NodeInfo)

    def links(self) -> list[LinkStatus]:
        """Outbound nodes connected to the grid now (the grid's owner only)."""
        return self._call("GET", "/links", list[LinkStatus])
