"""The wire protocol: typed JSON messages shared by nodes, the grid and the scientist.

Every request and response body that is not a tensor blob is one of these pydantic models.
Tensors travel separately as safetensors (see :mod:`voxgrid.tensors`). Routes are versioned
under :data:`API_PREFIX`; a breaking change to a message bumps it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from voxgrid.privacy.records import Estimate, LedgerView, Receipt  # noqa: F401  (re-exported for routes and clients)
from voxgrid.privacy.secagg.messages import (AdvertisedKeys, EncryptedShare, RevealedShare,  # noqa: F401
                                             RevealRequest)

API_PREFIX = "/v1"
#: Largest request body a node or grid accepts (weights of big 3D networks fit; 4 GiB does not).
MAX_BODY_BYTES = 512 * 1024 * 1024

Role = Literal["owner", "scientist", "node"]
JobKind = Literal["train", "evaluate"]
JobState = Literal["queued", "running", "done", "failed"]
Split = Literal["train", "val", "test"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
TAG_RE = re.compile(r"^#?[a-z0-9][a-z0-9_-]{0,31}$")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


def normalise_tag(tag: str) -> str:
    """``"CT"`` or ``"#ct"`` -> ``"#ct"``; raises ValueError naming a malformed tag."""
    t = tag.strip().lower()
    if not TAG_RE.match(t):
        raise ValueError(f"malformed tag {tag!r}: use letters, digits, '-' or '_', e.g. '#ct'")
    return t if t.startswith("#") else "#" + t


class Problem(Message):
    """Error body (in the spirit of RFC 9457 problem details)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str


class DatasetInfo(Message):
    """A dataset's published metadata: the allowlist of what may leave a node about it."""

    name: str
    description: str = ""
    tags: list[str]
    modality: str = "CT"
    volumes: int
    label_names: list[str] = Field(description="classes annotated at this site, background first")
    splits: dict[str, int] = Field(description="volume counts per split")
    shape_range: tuple[tuple[int, int, int], tuple[int, int, int]] | None = Field(
        None, description="smallest and largest image size per axis (i, j, k) in voxels; None: not known")
    spacing_range: tuple[tuple[float, float, float], tuple[float, float, float]] | None = Field(
        None, description="smallest and largest voxel spacing per axis (i, j, k) in mm; None: not known")


class NodeInfo(Message):
    name: str
    url: str
    api: str = API_PREFIX
    version: str
    device: str = Field(description="'cuda' or 'cpu'")
    datasets: list[DatasetInfo] = []
    connect: Literal["direct", "outbound"] = Field(
        "direct", description="'direct': the node listens at url; 'outbound': it listens on nothing and is "
                              "reached through its grid's relay (url still names its TLS certificate's host)")


class Health(Message):
    status: Literal["ok"] = "ok"
    name: str
    version: str


class WhoAmI(Message):
    name: str
    role: Role


class WeightsRef(Message):
    """A content address for a safetensors blob the scientist uploaded to a node."""

    weights_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int


class SecureAggregation(Message):
    """Asks that a train job's update leave the node only masked, as one input of a secure sum."""

    config: dict = Field(description="the round's voxgrid.privacy.secagg.SecAggConfig as JSON")
    weight: Literal["samples", "val_dice"] = Field(
        "samples", description="what the node scales its update by (the strategy's secure_weight)")


class SecAggKeysRequest(Message):
    """Round start: the node makes fresh key pairs for this round and returns them signed."""

    dataset: str
    secure: SecureAggregation


class SecAggSharesRequest(Message):
    """Every node's signed keys for the round; the node answers with its encrypted secret shares."""

    experiment_id: str = Field(pattern=NAME_RE.pattern)
    round: int = Field(ge=0)
    roster: list[AdvertisedKeys]


class SecAggMaskedRequest(Message):
    """The shares other nodes encrypted for this node; the answer is the job's masked update (octets)."""

    job_id: str
    inbox: list[EncryptedShare]


class JobRequest(Message):
    """One plan run on one dataset for one round, starting from given global weights."""

    kind: JobKind = "train"
    experiment_id: str = Field(pattern=NAME_RE.pattern)
    round: int = Field(ge=0)
    dataset: str
    plan: dict = Field(description="a voxgrid Plan as JSON; validated by the node against its allowlist")
    plan_hash: str
    weights_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    split: Split = Field("val", description="for evaluate jobs: which split to score")
    evaluate: bool = Field(True, description="train jobs: score the trained model on the val split")
    seed: int = 0
    secure: SecureAggregation | None = Field(None, description="train jobs: release the update only masked")


class Metrics(Message):
    loss: float | None = None
    dice: dict[str, float | None] = Field(default_factory=dict, description="per class, NaN-free; None if absent")
    mean_dice: float | None = None
    samples: int = 0
    steps: int = 0
    compute_s: float = Field(0.0, description="seconds of local compute (training + evaluation)")
    device: str = "cpu"


class JobStatus(Message):
    job_id: str
    kind: JobKind
    experiment_id: str
    round: int
    dataset: str
    state: JobState
    error: str | None = None
    metrics: Metrics | None = None
    has_update: bool = False
    privacy: Receipt | None = Field(None, description="the privacy receipt of the released update (train jobs)")

    @field_validator("error")
    @classmethod
    def _short_error(cls, v: str | None) -> str | None:
        return v[:2000] if v else v


class BudgetSet(Message):
    """An owner's privacy budget for a dataset: for one scientist, or (scientist None) everyone together."""

    dataset: str
    scientist: str | None = None
    epsilon: float = Field(ge=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)


class EstimateRequest(Message):
    """Ask a node what ``releases`` more train jobs with a filter chain would cost the caller on a dataset."""

    dataset: str
    privacy: dict | None = Field(None, description="a Plan.privacy value")
    releases: int = Field(1, ge=1, le=100_000)
    plan: dict | None = Field(None, description="the Plan (JSON) the jobs would run; needed for 'dp_sgd', "
                                                "whose cost depends on its batch size and epochs")


class TokenIssue(Message):
    name: str = Field(pattern=NAME_RE.pattern)
    role: Literal["owner", "scientist"] = "scientist"


class TokenIssued(Message):
    name: str
    role: Role
    token: str


class TokenInfo(Message):
    """A token as its owner lists it (``GET /v1/owner/tokens``): never the token or its hash. ``id``, the
    hash's first hex digits, names it for ``DELETE /v1/owner/tokens/{id}``. Times are UTC ISO 8601."""

    id: str
    name: str
    role: str
    created: str
    expires: str | None = Field(None, description="when it stops working; null: never")
    revoked: bool
    expired: bool


class AuditEntry(Message):
    at: str
    actor: str
    action: str
    detail: str


class NodeRegistration(Message):
    """What a node tells the grid about itself (the published metadata only)."""

    info: NodeInfo


class SearchResult(Message):
    node: str
    url: str
    dataset: DatasetInfo
    connect: Literal["direct", "outbound"] = "direct"


class LinkStatus(Message):
    """One outbound node's link to the grid, as the grid operator sees it: timing and sizes only."""

    node: str
    peer: str = Field(description="the address the link came from (the site's proxy, often)")
    connected_since: float = Field(description="Unix time")
    last_traffic: float = Field(description="Unix time of the last byte either way")
    tunnels_open: int
    tunnels_total: int
    bytes_up: int = Field(description="bytes carried from scientists to the node")
    bytes_down: int = Field(description="bytes carried from the node to scientists")


class SearchResponse(Message):
    results: list[SearchResult]


# the owner's decisions (nodes/service/approvals.py) --------------------------------------------
DatasetPolicy = Literal["open", "review", "rules"]
RequestState = Literal["pending", "approved", "denied", "revoked"]
#: Most releases one approval may grant, and most days it may last.
MAX_RELEASES, MAX_APPROVAL_DAYS = 100_000, 3650


class PolicyRules(Message):
    """A ``rules`` dataset's owner-written rules: a plan meeting all of them is approved automatically
    (once per scientist and plan), anything else waits for review. Unset limits do not apply."""

    require_dp: bool = Field(True, description="the plan's update must leave under a DP filter")
    max_epsilon_per_release: float | None = Field(None, gt=0, description="one release, at the plan's delta")
    max_epsilon_per_approval: float | None = Field(None, gt=0, description="all releases one approval grants")
    networks: list[str] | None = Field(None, max_length=64, description="allowed network classes, e.g. ['UNet']")
    max_patch_size: int | None = Field(None, ge=1, description="largest patch edge, voxels")
    max_rounds: int = Field(10, ge=1, le=MAX_RELEASES, description="most releases one automatic approval grants "
                                                                    "(a job without a request gets this many)")
    days: float = Field(30, gt=0, le=MAX_APPROVAL_DAYS, description="how long an automatic approval lasts")


class PolicyInfo(Message):
    dataset: str
    policy: DatasetPolicy
    rules: PolicyRules | None = None


class PolicySet(Message):
    """The owner sets a dataset's policy; ``rules`` only with ``policy='rules'`` (default rules if omitted)."""

    policy: DatasetPolicy
    rules: PolicyRules | None = None


class ApprovalRequestCreate(Message):
    """A scientist asks a dataset's owner to approve a plan (its JSON and content hash)."""

    dataset: str
    plan: dict = Field(description="a voxgrid Plan as JSON; validated by the node")
    plan_hash: str
    releases: int | None = Field(None, ge=1, le=MAX_RELEASES, description="jobs the scientist means to run")
    purpose: str = Field("", max_length=4000)


class PlanChange(Message):
    """One field (dotted path) whose value differs from the plan compared with."""

    field: str
    before: object = None
    after: object = None


class ApprovalRequestInfo(Message):
    """A request and, once decided, its decision. An approval covers jobs while ``valid``."""

    request_id: str
    scientist: str
    dataset: str
    plan_hash: str
    purpose: str = ""
    releases_asked: int | None = None
    created: str
    state: RequestState
    decided: str | None = None
    decided_by: str | None = None
    reason: str | None = None
    releases: int | None = Field(None, description="approved: jobs it covers")
    used: int = 0
    expires: str | None = None
    valid: bool = Field(False, description="approved, releases left and not expired")
    plan: dict | None = Field(None, description="the plan (the owner's detailed view)")
    compared_with: str | None = Field(None, description="the request whose approved plan the changes are against")
    changes: list[PlanChange] | None = None
    projected: Estimate | None = Field(None, description="what its releases would cost, by the node's accountant, "
                                                         "against the budgets that apply now")
    findings: list[str] | None = Field(None, description="a 'rules' dataset: the rules the plan does not meet")


class ApprovalDecision(Message):
    """The owner's decision on a request: approve (releases, days), deny (reason) or revoke (reason)."""

    releases: int | None = Field(None, ge=1, le=MAX_RELEASES)
    days: float | None = Field(None, gt=0, le=MAX_APPROVAL_DAYS)
    reason: str | None = Field(None, max_length=4000)
