"""The allowlist of components a plan may name, and the checks a component spec must pass.

A component spec is a MONAI-bundle-style dict, ``{"_target_": "UNet", **kwargs}``. Unlike a
bundle, ``_target_`` is a short name looked up in the fixed tables below (never imported by
path), and kwargs are literal JSON: no ``$expressions``, ``@references``, ``%macros`` or
``_requires_``-style directives (security invariant 3).

The tables ``NETWORKS``, ``LOSSES``, ``OPTIMIZERS`` and ``TRANSFORMS`` are read-only mappings
built on first access, because importing ``monai.networks`` takes seconds and most users of
``voxgrid.plan`` (the CLI, the grid client) never build a component.
"""

from __future__ import annotations

import functools
import inspect
import math
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "NETWORKS",
    "LOSSES",
    "OPTIMIZERS",
    "TRANSFORMS",
    "DATA_KEYS",
    "table",
    "spec_problems",
    "effective_argument",
    "json_problems",
]

#: Keys of the sample dicts a node's data pipeline carries; transforms may touch only these.
DATA_KEYS = ("image", "label")

#: Bound on nesting depth of kwargs, so a hostile plan cannot exhaust the recursion limit.
_MAX_DEPTH = 16

# Strings a MONAI bundle parser would treat as code or references, not as literals.
_REFERENCE_PREFIXES = ("$", "@", "%")

# The allowlist tables, built on first access by the module ``__getattr__`` below (PEP 562). Declared
# (not assigned) here so that ``__all__`` names them and type checkers know them.
NETWORKS: Mapping[str, type]
LOSSES: Mapping[str, type]
OPTIMIZERS: Mapping[str, type]
TRANSFORMS: Mapping[str, type]


def _networks() -> dict[str, type]:
    from monai.networks import nets

    return {
        "UNet": nets.UNet,
        "BasicUNet": nets.BasicUNet,
        "SegResNet": nets.SegResNet,
        "DynUNet": nets.DynUNet,
        "UNETR": nets.UNETR,
        "SwinUNETR": nets.SwinUNETR,
        "AttentionUnet": nets.AttentionUnet,
        "VNet": nets.VNet,
    }


def _losses() -> dict[str, type]:
    from monai import losses

    return {
        "DiceLoss": losses.DiceLoss,
        "DiceCELoss": losses.DiceCELoss,
        "DiceFocalLoss": losses.DiceFocalLoss,
        "GeneralizedDiceLoss": losses.GeneralizedDiceLoss,
        "TverskyLoss": losses.TverskyLoss,
        "FocalLoss": losses.FocalLoss,
    }


def _optimizers() -> dict[str, type]:
    from torch import optim

    return {"Adam": optim.Adam, "AdamW": optim.AdamW, "SGD": optim.SGD, "RMSprop": optim.RMSprop}


def _transforms() -> dict[str, type]:
    from monai import transforms as t

    return {
        "ScaleIntensityRanged": t.ScaleIntensityRanged,
        "NormalizeIntensityd": t.NormalizeIntensityd,
        "ScaleIntensityd": t.ScaleIntensityd,
        "Spacingd": t.Spacingd,
        "Orientationd": t.Orientationd,
        "CropForegroundd": t.CropForegroundd,
        "SpatialPadd": t.SpatialPadd,
        "ResizeWithPadOrCropd": t.ResizeWithPadOrCropd,
        "ThresholdIntensityd": t.ThresholdIntensityd,
        "RandFlipd": t.RandFlipd,
        "RandRotate90d": t.RandRotate90d,
        "RandScaleIntensityd": t.RandScaleIntensityd,
        "RandShiftIntensityd": t.RandShiftIntensityd,
        "RandGaussianNoised": t.RandGaussianNoised,
        "RandAffined": t.RandAffined,
        "RandZoomd": t.RandZoomd,
    }


# kind (as used in messages) -> (module attribute, factory)
_KINDS: dict[str, tuple[str, Callable[[], dict[str, type]]]] = {
    "network": ("NETWORKS", _networks),
    "loss": ("LOSSES", _losses),
    "optimizer": ("OPTIMIZERS", _optimizers),
    "transform": ("TRANSFORMS", _transforms),
}
_BY_ATTRIBUTE = {attr: kind for kind, (attr, _) in _KINDS.items()}


@functools.cache
def table(kind: str) -> Mapping[str, type]:
    """The read-only allowlist for ``kind`` ("network", "loss", "optimizer" or "transform")."""
    return MappingProxyType(_KINDS[kind][1]())


def __getattr__(name: str) -> Mapping[str, type]:
    # PEP 562: NETWORKS etc. are importable names, built on first use.
    if name in _BY_ATTRIBUTE:
        return table(_BY_ATTRIBUTE[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls)


def json_problems(value: Any, path: str) -> list[str]:
    """Why ``value`` is not a plain-JSON literal free of bundle syntax; empty when it is."""
    return list(_value_problems(value, path))


def _value_problems(value: Any, path: str, depth: int = 0) -> Iterable[str]:
    if depth > _MAX_DEPTH:
        yield f"{path}: nested more than {_MAX_DEPTH} levels deep"
    elif value is None or isinstance(value, (bool, int)):
        return
    elif isinstance(value, float):
        if not math.isfinite(value):
            yield f"{path}: {value!r} is not a finite number"
    elif isinstance(value, str):
        if value.startswith(_REFERENCE_PREFIXES) or "#" in value:
            yield (
                f"{path}: {value!r} looks like a MONAI bundle expression or reference "
                "('$', '@', '%', '#'); plans take literal values only"
            )
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _value_problems(item, f"{path}[{i}]", depth + 1)
    elif isinstance(value, dict):
        yield from _dict_problems(value, path, depth)
    else:
        yield f"{path}: a {type(value).__name__} is not a plain JSON value"


def _dict_problems(value: dict, path: str, depth: int) -> Iterable[str]:
    """A JSON object's keys must be plain strings (no bundle directives, no nested component); its
    values are checked like any value, one level deeper."""
    for key, item in value.items():
        if not isinstance(key, str):
            yield f"{path}: key {key!r} is not a string"
        elif key == "_target_":
            yield f"{path}: \"_target_\" is not allowed here (a component cannot contain another component)"
        elif key.startswith("_"):
            yield f"{path}: key {key!r} is not allowed (MONAI bundle directives are not supported)"
        else:
            yield from _value_problems(item, f"{path}.{key}", depth + 1)


def _keys_problems(name: str, key_arg: str, value: Any, where: str) -> Iterable[str]:
    keys = [value] if isinstance(value, str) else value
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        yield f"{where} ({name}): {key_arg!r} must be a key or a non-empty list of keys from {list(DATA_KEYS)}"
        return
    for key in keys:
        if key not in DATA_KEYS:
            yield f"{where} ({name}): {key_arg} entry {key!r} is not a data key; allowed: {', '.join(DATA_KEYS)}"


def _target_problems(kind: str, spec: Any, where: str) -> list[str]:
    """Why ``spec`` does not name an allowed component of ``kind`` in ``"_target_"``; empty when it does."""
    if not isinstance(spec, dict):
        return [f"{where}: must be a JSON object like {{\"_target_\": \"Name\", ...}}, not {type(spec).__name__}"]
    target = spec.get("_target_")
    allowed = table(kind)
    allowed_list = ", ".join(sorted(allowed))
    if not isinstance(target, str):
        return [f"{where}: \"_target_\" must name an allowed {kind}; allowed: {allowed_list}"]
    if target not in allowed:
        return [f"{where}: \"_target_\" {target!r} is not an allowed {kind}; allowed: {allowed_list}"]
    return []


def _argument_problems(cls: type, target: str, kwargs: dict, where: str, supplied: Mapping[str, str]) -> list[str]:
    """Arguments the constructor of ``cls`` does not take, voxgrid sets itself, or requires but lacks."""
    params = _signature(cls).parameters
    takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        n: p
        for n, p in params.items()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        and p.kind is not inspect.Parameter.POSITIONAL_ONLY
    }
    problems = []
    for arg in kwargs:
        if not isinstance(arg, str) or arg.startswith("_"):
            continue  # already reported by _value_problems
        if arg in supplied:
            problems.append(f"{where} ({target}): argument {arg!r} is set by voxgrid ({supplied[arg]}); remove it")
        elif arg not in named and not takes_var_kwargs:
            accepted = ", ".join(sorted(n for n in named if n not in supplied))
            problems.append(f"{where} ({target}): unknown argument {arg!r}; accepted: {accepted}")
    for arg, param in named.items():
        if param.default is inspect.Parameter.empty and arg not in kwargs and arg not in supplied:
            problems.append(f"{where} ({target}): missing required argument {arg!r}")
    return problems


def spec_problems(kind: str, spec: Any, where: str, supplied: Mapping[str, str] | None = None) -> list[str]:
    """Everything wrong with component ``spec`` of ``kind``; empty when it may be built.

    ``where`` names the spec in messages (e.g. ``"plan.network"``). ``supplied`` maps
    constructor arguments that voxgrid fills in itself (an optimiser's ``params``) to a short
    description, so a plan that sets them is refused rather than silently overridden.
    """
    supplied = supplied or {}
    problems = _target_problems(kind, spec, where)
    if problems:
        return problems
    target = spec["_target_"]
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    problems = json_problems(kwargs, where)
    problems.extend(_argument_problems(table(kind)[target], target, kwargs, where, supplied))
    if kind == "transform":
        for key_arg in ("keys", "source_key"):
            if key_arg in kwargs:
                problems.extend(_keys_problems(target, key_arg, kwargs[key_arg], where))
    return problems


def effective_argument(kind: str, spec: dict, arg: str) -> Any:
    """The value ``arg`` takes when ``spec`` is built: the spec's own, else the constructor's default.

    Returns ``inspect.Parameter.empty`` when the constructor has no such argument or no default.
    """
    if arg in spec:
        return spec[arg]
    param = _signature(table(kind)[spec["_target_"]]).parameters.get(arg)
    return inspect.Parameter.empty if param is None else param.default
