"""Attention methods, one file each. Importing this package registers every method file in it.

The file list is discovered, not hand-kept: a new method file registers itself on import.
"""

import importlib
import pkgutil

from attnsieve.methods.base import AttnOutput, LayerContext, Method, SparseMethod, exact_attention
from attnsieve.methods.registry import (
    describe,
    has_param,
    leak_free_params,
    make,
    method_class,
    names,
    parse_params,
    register,
)

_INFRA = {"base", "registry", "selection"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _INFRA and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "AttnOutput",
    "LayerContext",
    "Method",
    "SparseMethod",
    "describe",
    "exact_attention",
    "has_param",
    "leak_free_params",
    "make",
    "method_class",
    "names",
    "parse_params",
    "register",
]
