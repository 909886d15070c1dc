"""Type checks shared by every hyperparameter dataclass (methods and KV policies), applied by their registries.

A value of the wrong type is a `TypeError` naming the parameter, raised before the dataclass's own
range checks run (which would otherwise fail deep inside with an unhelpful message, or, for
`per_head="no"`, silently take a non-empty string as true). bool fields take only bools, int
fields only integers (not bools), float fields any real number; `X | None` also takes None;
Literal fields one of their values (another value of the right type is a ValueError).
Only the values a caller passes are checked, never defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import types
import typing
from typing import Any


def _matches(value: Any, ann: Any) -> bool:
    origin = typing.get_origin(ann)
    if ann is Any:
        return True
    if ann is type(None) or ann is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(ann))
    if origin is typing.Literal:  # the type here; which value is the dataclass's range check (ValueError)
        return any(type(value) is type(a) for a in typing.get_args(ann))
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(origin, type) and isinstance(value, origin)
    return isinstance(value, ann) if isinstance(ann, type) else True


def _describe(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if ann is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(ann))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if ann is float:
        return "a number"
    if ann is bool:
        return "a bool (True or False)"
    return "an int" if ann is int else getattr(origin or ann, "__name__", str(ann))


def check_types(cls: type, values: dict[str, Any]) -> None:
    """TypeError naming the first of `values` (field name -> value) whose type `cls`'s field does not allow."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: nothing to check against
        return
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in names or name not in hints:
            continue
        ann = hints[name]
        if not _matches(value, ann):
            raise TypeError(f"parameter {name} must be {_describe(ann)}, got {type(value).__name__} {value!r}")
        choices = [a for a in (ann, *typing.get_args(ann)) if typing.get_origin(a) is typing.Literal]
        if choices and value is not None and not any(value in typing.get_args(c) for c in choices):
            raise ValueError(f"parameter {name} must be {_describe(choices[0])}, got {value!r}")


def enforce_types(cls: type) -> type:
    """Make `cls(...)` check the types of the values passed before its own __init__/__post_init__ run."""
    if not dataclasses.is_dataclass(cls) or "_attnsieve_checked_init" in cls.__dict__:
        return cls
    init = cls.__init__
    sig = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError:  # wrong arity or unknown name: let the dataclass raise its own message
            pass
        else:
            check_types(cls, {k: v for k, v in list(bound.arguments.items())[1:]})
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    cls._attnsieve_checked_init = True
    return cls
