"""Declarative, hashed training plans and the builders that turn them into torch objects.

A plan is data, not code (security invariant 3): every component is a MONAI-bundle-style dict
resolved through the allowlist in :mod:`voxgrid.components`, checked when the plan is made and
again when a node builds it. The plan's JSON is canonical, so its ``content_hash`` names exactly
one recipe and a data owner can approve or audit it.

>>> plan = unet_plan(["background", "pancreas", "tumor"], local_epochs=2)
>>> net = build_network(plan)
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from typing import Annotated, Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from voxgrid import components

__all__ = [
    "PlanError",
    "Plan",
    "LocalTraining",
    "unet_plan",
    "build_network",
    "build_loss",
    "build_optimizer",
    "build_transforms",
    "initial_weights",
    "local_keys",
    "prefixed_keys",
    "TaskPriority",
]

# Strict so that JSON like `"batch_size": "2"` or `true` is refused instead of coerced.
_PosInt = Annotated[int, Strict(), Field(ge=1)]
_PatchDim = Annotated[int, Strict(), Field(ge=8)]
_Weight = Annotated[float, Strict(), Field(ge=0)]

_OPTIMIZER_SUPPLIED = {"params": "the network's parameters"}


class PlanError(ValueError):
    """A plan, or one of its components, is not acceptable; the message names the field."""


def _plain(value: Any) -> Any:
    """Deep copy with tuples as lists, so a plan owns its data and equals its JSON round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _location(loc: Sequence[int | str]) -> str:
    path = "plan"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _known_fields(loc: Sequence[int | str]) -> list[str]:
    """Field names of the (nested) model at ``loc`` below Plan, or [] if it is not a model."""
    model: Any = Plan
    for part in loc:
        ann = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, PlanError):
            lines.append(str(cause))
            continue
        if err["type"] == "extra_forbidden":
            known = _known_fields(err["loc"][:-1])
            lines.append(f"{_location(err['loc'])}: unknown field" + (f"; known: {', '.join(known)}" if known else ""))
            continue
        line = f"{_location(err['loc'])}: {err['msg']}"
        if err["type"] != "missing" and isinstance(err.get("input"), (str, int, float, bool, type(None))):
            line += f" (got {err['input']!r})"
        lines.append(line)
    return "\n".join(lines)


class TaskPriority(BaseModel):
    """Dynamic task prioritisation (Guo et al. 2018), as the multi-task pancreas study used it at clients.

    A *task* is one foreground class the site annotates. Task c's loss gets the weight
    ``W_c = -(1 - kbar_c)^gamma * log(kbar_c)``, with ``kbar_c = alpha * Dice_c^r + (1 - alpha) * kbar_c``
    updated every batch (``Dice_c`` the batch's soft Dice of class c): tasks the model already
    does well get less weight.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    gamma: Annotated[float, Strict(), Field(ge=0)] = 1.0
    #: weight of the current batch in the moving average (1: no memory)
    alpha: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.5
    r: Annotated[float, Strict(), Field(gt=0)] = 1.0


class LocalTraining(BaseModel):
    """Client-side training options, usually set by the strategy (``Strategy.configure_plan``).

    They travel with the plan, so they are part of its hash and a data owner sees them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    #: FedProx: the node adds proximal_mu / 2 * ||w - w_global||^2 (sum over trainable
    #: parameters, w_global the weights the job started from) to its loss; 0 disables it.
    proximal_mu: Annotated[float, Strict(), Field(ge=0)] = 0.0
    #: FedBN: parameter groups each site keeps to itself, never sent or aggregated. ``"norm"`` is
    #: every normalisation layer's affine parameters and running statistics (see :func:`local_keys`).
    #: The node keeps its own copy per experiment and round, and uses it in the experiment's jobs.
    keep_local: tuple[Literal["norm", "head"], ...] = ()
    #: Multi-task heads: state-dict name prefixes of the task head (e.g. ``("model.2",)``, MONAI
    #: UNet's last up-sampling block). With ``"head"`` in ``keep_local`` each site keeps its own head
    #: and only the body (the shared representation) is aggregated.
    head: tuple[Annotated[str, Strict(), Field(min_length=1, max_length=200)], ...] = ()
    #: Train only parameters under these name prefixes (e.g. the head, when fine-tuning after
    #: federation); empty trains everything. Frozen parameters get no gradient and no optimiser step.
    train_only: tuple[Annotated[str, Strict(), Field(min_length=1, max_length=200)], ...] = ()
    #: Dynamic task prioritisation (see :class:`TaskPriority`); None trains on the plain loss.
    dtp: TaskPriority | None = None

    @model_validator(mode="after")
    def _head_named(self) -> LocalTraining:
        if "head" in self.keep_local and not self.head:
            raise PlanError("plan.local.keep_local contains 'head' but plan.local.head names no parameter "
                            "prefix (e.g. ['model.2'] for UNet's last block)")
        return self


class Plan(BaseModel):
    """A training recipe: components, label names, patch sampling, epochs and inference settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: Annotated[str, Strict(), Field(min_length=1, max_length=200)] = "plan"
    network: dict[str, Any]
    loss: dict[str, Any]
    optimizer: dict[str, Any]
    #: Applied to train, val and test samples.
    preprocessing: list[dict[str, Any]] = []
    #: Applied to training samples only, after preprocessing.
    augmentation: list[dict[str, Any]] = []
    #: Global class names; index 0 is background.
    labels: list[Annotated[str, Strict(), Field(min_length=1)]]
    patch_size: tuple[_PatchDim, _PatchDim, _PatchDim]
    batch_size: _PosInt = 2
    samples_per_volume: _PosInt = 2
    #: Foreground/background patch-centre ratio, as RandCropByPosNegLabeld's (pos, neg).
    pos_neg: tuple[_Weight, _Weight] = (1.0, 1.0)
    local_epochs: _PosInt = 1
    steps_per_epoch: _PosInt | None = None
    sw_overlap: Annotated[float, Strict(), Field(ge=0, lt=1)] = 0.25
    sw_batch_size: _PosInt = 2
    #: Mixed precision; nodes apply it on CUDA only.
    amp: Annotated[bool, Strict()] = True
    #: Reserved for privacy requirements; opaque JSON for now.
    privacy: dict[str, Any] | None = None
    #: Client-side training options a strategy contributes (FedProx's mu, ...).
    local: LocalTraining = LocalTraining()

    def __init__(self, /, **data: Any) -> None:
        # One exception type for callers: a bad plan is a PlanError however it was made.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise PlanError(_describe(exc)) from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Plan:
        """Pydantic's model_validate, raising PlanError (nodes validate received plans this way)."""
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise PlanError(_describe(exc)) from None

    @field_validator("network", "loss", "optimizer", "preprocessing", "augmentation", "privacy", mode="before")
    @classmethod
    def _own_copy(cls, value: Any) -> Any:
        return _plain(value)

    @model_validator(mode="after")
    def _check(self) -> Plan:
        problems = components.spec_problems("network", self.network, "plan.network")
        if not problems:
            problems += self._network_shape_problems()
        problems += components.spec_problems("loss", self.loss, "plan.loss")
        problems += components.spec_problems("optimizer", self.optimizer, "plan.optimizer", _OPTIMIZER_SUPPLIED)
        for field in ("preprocessing", "augmentation"):
            for i, spec in enumerate(getattr(self, field)):
                problems += components.spec_problems("transform", spec, f"plan.{field}[{i}]")
        problems += self._label_problems()
        if not problems and (self.local.head or self.local.train_only):
            problems += self._prefix_problems()
        if sum(self.pos_neg) <= 0:
            problems.append("plan.pos_neg: at least one of (foreground, background) must be > 0")
        if self.privacy is not None:
            problems += components.json_problems(self.privacy, "plan.privacy")
        if not problems and _asks_dp_sgd(self.privacy):
            with torch.device("meta"):
                problems += dp_sgd_problems(self, build_network(self))
        if problems:
            raise PlanError("\n".join(problems))
        return self

    def _network_shape_problems(self) -> list[str]:
        target = self.network["_target_"]
        n = len(self.labels)
        expected = {
            "in_channels": (1, "volumes have one channel"),
            "out_channels": (n, f"labels names {n} classes {self.labels}"),
            "spatial_dims": (3, "patches are 3-D"),
        }
        problems = []
        for arg, (want, why) in expected.items():
            have = components.effective_argument("network", self.network, arg)
            if have is inspect.Parameter.empty or have == want:
                continue
            source = "" if arg in self.network else " (its default)"
            problems.append(f"plan.network ({target}): {arg} is {have!r}{source} but {why}, so it must be {want}")
        return problems

    def _prefix_problems(self) -> list[str]:
        """plan.local.head / train_only must name parameters of this network (built on the meta device)."""
        with torch.device("meta"):
            names = set(build_network(self).state_dict())
        problems = []
        for field in ("head", "train_only"):
            try:
                prefixed_keys(names, getattr(self.local, field), f"plan.local.{field}")
            except PlanError as exc:
                problems.append(str(exc))
        return problems

    def _label_problems(self) -> list[str]:
        problems = []
        if len(self.labels) < 2:
            problems.append("plan.labels: needs at least 2 names (background and one class)")
        if self.labels and self.labels[0] != "background":
            problems.append(f"plan.labels: the first name must be 'background', not {self.labels[0]!r}")
        duplicates = sorted({x for x in self.labels if self.labels.count(x) > 1})
        if duplicates:
            problems.append(f"plan.labels: names must be unique; repeated: {', '.join(duplicates)}")
        return problems

    def with_local(self, **settings: Any) -> Plan:
        """A validated copy with ``local`` settings replaced (the hash changes with them)."""
        data = self.model_dump(mode="json")
        return Plan(**{**data, "local": {**data["local"], **settings}})

    @property
    def content_hash(self) -> str:
        """``"sha256:<hex>"`` of the canonical JSON; equal plans hash equal in any process."""
        return "sha256:" + hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def to_json(self, indent: int | None = None) -> str:
        """Canonical JSON (sorted keys; compact unless ``indent`` is given)."""
        separators = (",", ":") if indent is None else (",", ": ")
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=separators, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Parse and validate a plan; raises PlanError for bad JSON or bad fields."""
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise PlanError(f"plan: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PlanError(f"plan: must be a JSON object, not {type(data).__name__}")
        return cls(**data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _asks_dp_sgd(privacy: dict | None) -> bool:
    """Whether a well-formed privacy spec includes DP-SGD (a malformed one is the node's to refuse, by field)."""
    from voxgrid.privacy import PrivacySpec, PrivacySpecError

    try:
        spec = PrivacySpec.parse(privacy)
    except PrivacySpecError:
        return False
    return spec is not None and spec.dp_sgd is not None


def dp_sgd_problems(plan: Plan, net: torch.nn.Module) -> list[str]:
    """What in ``plan`` (with its network ``net``) DP-SGD cannot train soundly, one line each.

    Layers are refused, not replaced: replacing batch norm at one node would change the network's
    tensors, and its update would no longer fit the federation's model. The scientist changes the
    plan instead (e.g. ``"norm": "instance"`` for MONAI's UNet).
    """
    problems = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            problems.append(f"plan.network: layer {name!r} ({type(m).__name__}): batch norm mixes the patients of "
                            "a batch, so no per-patient gradient exists for DP-SGD; use instance, group or layer "
                            "norm (e.g. \"norm\": \"instance\" in plan.network)")
        elif list(m.buffers(recurse=False)):
            problems.append(f"plan.network: layer {name!r} ({type(m).__name__}): its running statistics "
                            f"({', '.join(n for n, _ in m.named_buffers(recurse=False))}) follow the patients "
                            "without noise, so DP-SGD cannot use it (e.g. turn track_running_stats off)")
    if plan.local.dtp is not None:
        problems.append("plan.local.dtp: dynamic task priority weighs every patient's loss by the batch's Dice, "
                        "so one patient changes the others' gradients and DP-SGD's clipping no longer bounds them")
    return problems


def unet_plan(
    labels: Sequence[str],
    patch_size: Sequence[int] = (32, 32, 32),
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    lr: float = 2e-3,
    norm: Literal["instance", "group", "batch"] = "instance",
    norm_groups: int = 2,
    **overrides: Any,
) -> Plan:
    """A sensible CT segmentation plan: 3-D UNet, Dice+CE, Adam, HU window [-200, 300] -> [0, 1].

    ``norm``: the UNet's normalisation; ``"group"`` (``norm_groups`` groups, which must divide every
    normalised channel count, including the classes' with residual units) is the usual choice for DP-SGD (per-sample, no running statistics: De et al. 2022),
    ``"instance"`` MONAI's default; batch norm is refused under DP-SGD (:func:`dp_sgd_problems`).
    ``overrides`` replace any other Plan field (``local_epochs``, ``augmentation``, ``loss``, ...).
    """
    fields: dict[str, Any] = {
        "name": "unet",
        "network": {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": len(labels),
            "channels": list(channels),
            "strides": list(strides),
            "num_res_units": num_res_units,
            # Only when not MONAI's default (instance), so existing plans keep their hash.
            **({} if norm == "instance" else {"norm": norm if norm == "batch" else ["group", {"num_groups": norm_groups}]}),
        },
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {"_target_": "Adam", "lr": lr},
        "preprocessing": [
            {
                "_target_": "ScaleIntensityRanged",
                "keys": ["image"],
                "a_min": -200,
                "a_max": 300,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        ],
        "labels": list(labels),
        "patch_size": tuple(patch_size),
        # Four balanced patches per volume: small sites (a handful of cases) still get enough steps.
        "samples_per_volume": 4,
    }
    fields.update(overrides)
    plan = Plan(**fields)
    if norm == "group":  # MONAI checks the groups only when it builds the layers: build it, on no memory
        try:
            with torch.device("meta"):
                build_network(plan)
        except ValueError as exc:
            raise PlanError(f"norm_groups={norm_groups} must divide every normalised channel count (channels "
                            f"{list(channels)}, and the {len(labels)} classes with residual units): {exc}") from None
    return plan


def _resolve(kind: str, spec: dict, where: str, supplied: dict[str, str] | None = None) -> tuple[type, dict]:
    """The allowlisted class and a private copy of the kwargs for ``spec``; PlanError if refused."""
    # Re-checked here, not only in Plan: the node must never build an unchecked spec, even one
    # mutated after validation (pydantic's frozen does not freeze nested dicts).
    problems = components.spec_problems(kind, spec, where, supplied)
    if problems:
        raise PlanError("\n".join(problems))
    kwargs = copy.deepcopy({k: v for k, v in spec.items() if k != "_target_"})
    return components.table(kind)[spec["_target_"]], kwargs


def build_network(plan: Plan) -> torch.nn.Module:
    """The plan's network, freshly initialised from torch's current RNG state."""
    cls, kwargs = _resolve("network", plan.network, "plan.network")
    return cls(**kwargs)


def build_loss(plan: Plan, classes: Sequence[int] | None = None) -> torch.nn.Module:
    """The plan's loss; a JSON list ``weight`` (per-class weights) becomes a float tensor.

    ``classes``: global class indices, in the order of the channels the loss will see (a site
    that annotates only some classes trains on fewer channels); a per-class ``weight`` list is
    restricted to them.
    """
    cls, kwargs = _resolve("loss", plan.loss, "plan.loss")
    if classes is not None and isinstance(kwargs.get("weight"), list):
        if len(kwargs["weight"]) != len(plan.labels):
            raise PlanError(f"plan.loss.weight: {len(kwargs['weight'])} entries, but the plan names "
                            f"{len(plan.labels)} classes {plan.labels}")
        kwargs["weight"] = [kwargs["weight"][c] for c in classes]
    if isinstance(kwargs.get("weight"), list):
        # DiceCELoss registers weight as a buffer, which must be a tensor.
        kwargs["weight"] = torch.tensor(kwargs["weight"], dtype=torch.float32)
    return cls(**kwargs)


def build_optimizer(plan: Plan, params: Any) -> torch.optim.Optimizer:
    """The plan's optimiser over ``params`` (an iterable of tensors or param groups)."""
    cls, kwargs = _resolve("optimizer", plan.optimizer, "plan.optimizer", _OPTIMIZER_SUPPLIED)
    return cls(params, **kwargs)


def build_transforms(specs: list[dict]) -> list:
    """MONAI dictionary transforms for ``specs`` (e.g. ``plan.preprocessing``), in order."""
    built = []
    for i, spec in enumerate(specs):
        cls, kwargs = _resolve("transform", spec, f"transforms[{i}]")
        built.append(cls(**kwargs))
    return built


def initial_weights(plan: Plan, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic starting weights: the state_dict of the network built under ``seed``."""
    # fork_rng keeps the caller's global RNG stream untouched by our seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(plan)
    return {name: t.detach().contiguous().clone() for name, t in network.state_dict().items()}


_NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def prefixed_keys(keys: Sequence[str] | set[str], prefixes: Sequence[str], where: str) -> set[str]:
    """The keys equal to, or under (``prefix.``), one of ``prefixes``; PlanError if a prefix matches none."""
    found = set()
    for prefix in prefixes:
        hit = {k for k in keys if k == prefix or k.startswith(prefix.rstrip(".") + ".")}
        if not hit:
            raise PlanError(f"{where}: {prefix!r} names no parameter of the network "
                            f"(its names start e.g. {sorted(keys)[:3]} ... {sorted(keys)[-3:]})")
        found |= hit
    return found


def local_keys(plan: Plan, network: torch.nn.Module | None = None) -> set[str]:
    """State-dict keys of the groups in ``plan.local.keep_local`` (FedBN's site-kept state).

    ``"norm"``: parameters and buffers of BatchNorm/InstanceNorm/GroupNorm/LayerNorm modules,
    found by module type, not by name. ``"head"``: every key under a ``plan.local.head`` prefix.
    Without ``network`` one is built on the meta device (no memory).
    """
    if not plan.local.keep_local:
        return set()
    if network is None:
        with torch.device("meta"):
            network = build_network(plan)
    keys = set()
    for prefix, module in network.named_modules():
        if "norm" in plan.local.keep_local and isinstance(module, _NORM_TYPES):
            for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                keys.add(f"{prefix}.{name}" if prefix else name)
    state = set(network.state_dict())
    if "head" in plan.local.keep_local:
        keys |= prefixed_keys(state, plan.local.head, "plan.local.head")
    return keys & state
