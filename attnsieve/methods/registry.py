"""The one registry of attention methods: names, families, phases, parameters.

`@register(...)` on a Method subclass is the single source of truth; the CLI choices,
`attnsieve methods`, test parametrisation and the README table all derive from it.
Registering a method here never touches transformers.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from attnsieve.methods.base import Method
from attnsieve.params import enforce_types

_REGISTRY: dict[str, type[Method]] = {}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}

FAMILIES = ("exact", "sparse", "hashing", "clustering", "lowrank", "hybrid", "calibration")
PHASES = ("prefill", "decode")


def register(
    name: str,
    *,
    family: str,
    phases: tuple[str, ...] = ("prefill",),
    supports_causal_mask: bool = True,
    params: type,
    summary: str,
):
    """Class decorator: register a Method subclass under `name` with its hyperparameter dataclass.

    `supports_causal_mask`: the method can mask the future at all (False only for non-causal
    approximations such as Nystrom). Whether the method's default estimate looks ahead (`lookahead`)
    is read from its parameters: a method whose paper estimates from the prompt's own last queries
    or a block's own queries has a `causal: bool` parameter whose default is False (the paper's
    behaviour); `causal=True` selects its leak-free estimator.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not set(phases) <= set(PHASES):
        raise ValueError(f"phases must be a subset of {PHASES}, got {phases!r}")
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"params of {name!r} must be a dataclass, got {params!r}")

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name, cls.family, cls.phases = name, family, tuple(phases)
        cls.supports_causal_mask = supports_causal_mask
        causal_field = next((f for f in dataclasses.fields(params) if f.name == "causal"), None)
        if causal_field is not None and not isinstance(causal_field.default, bool):
            raise TypeError(f"the `causal` parameter of {name!r} must default to a bool")
        cls.lookahead = causal_field is not None and not causal_field.default
        cls.Params, cls.summary = enforce_types(params), summary  # density="0.1": TypeError naming density
        _REGISTRY[name] = cls
        return cls

    return wrap


def register_alias(name: str, target: str, **defaults: Any) -> None:
    """Register `name` as `target` with different default parameters (not a second implementation)."""
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"method {name!r} is registered twice")
    _ALIASES[name] = (target, defaults)


def names() -> list[str]:
    return sorted([*_REGISTRY, *_ALIASES])


def _resolve(name: str) -> tuple[type[Method], dict[str, Any]]:
    if name in _ALIASES:
        target, defaults = _ALIASES[name]
        return _REGISTRY[target], dict(defaults)
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(names())}")
    return _REGISTRY[name], {}


def method_class(name: str) -> type[Method]:
    return _resolve(name)[0]


def make(name: str, **params: Any) -> Method:
    """Instantiate a registered method with validated hyperparameters."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a registered name (str), got {type(name).__name__} {name!r}")
    cls, defaults = _resolve(name)
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for method {name!r}; "
            f"allowed: {', '.join(sorted(fields)) or '(none)'}"
        )
    return cls(cls.Params(**{**defaults, **params}))


def _convert(text: str, annotation: Any, key: str) -> Any:
    """Turn a CLI string into the field's declared type (int, float, bool, str, or Optional of one)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # dataclass annotations under `from __future__`
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        if text not in args:
            raise ValueError(f"{key}={text!r}: allowed values are {', '.join(map(str, args))}")
        return text
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return annotation(text)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={text!r} is not a valid {getattr(annotation, '__name__', annotation)}") from None


def parse_params(name: str, pairs: dict[str, str]) -> dict[str, Any]:
    """Convert `--set key=value` strings to typed parameters of method `name`."""
    cls, _ = _resolve(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    out = {}
    for key, text in pairs.items():
        if key not in fields:
            raise ValueError(
                f"unknown parameter {key!r} for method {name!r}; allowed: {', '.join(sorted(fields)) or '(none)'}"
            )
        out[key] = _convert(text, fields[key].type, key)
    return out


def describe(name: str) -> dict[str, Any]:
    """JSON-ready description: name, family, phases, supports_causal_mask, lookahead, params, param_help.

    `lookahead`: the default estimate looks at later queries of the same call, as the method's paper
    does; such a method takes `causal=True` for a leak-free estimate (see `leak_free_params`).
    """
    cls, defaults = _resolve(name)
    fields = dataclasses.fields(cls.Params)
    return {
        "name": name,
        "family": cls.family,
        "phases": list(cls.phases),
        "supports_causal_mask": cls.supports_causal_mask,
        "lookahead": bool(defaults.get("causal") is False) if "causal" in defaults else cls.lookahead,
        "alias_of": _ALIASES[name][0] if name in _ALIASES else None,
        "summary": cls.summary,
        "params": {f.name: defaults.get(f.name, f.default) for f in fields},
        "param_help": {f.name: f.metadata.get("help", "") for f in fields},
    }


def has_param(name: str, param: str) -> bool:
    return any(f.name == param for f in dataclasses.fields(method_class(name).Params))


def leak_free_params(name: str) -> dict[str, Any]:
    """Parameters that make `name` prefix-consistent: {"causal": True} for a look-ahead default, else {}."""
    cls, defaults = _resolve(name)
    lookahead = not defaults["causal"] if "causal" in defaults else cls.lookahead
    return {"causal": True} if lookahead else {}
