"""KV-cache policies for decoding, one file each. Importing this package registers every policy file.

The file list is discovered, not hand-kept: a new policy file registers itself on import.
"""

import importlib
import pkgutil

from attnsieve.cache.base import (
    EvictingKV,
    KVPolicy,
    KVPolicyParams,
    LayerKV,
    Rotary,
    WindowKV,
    describe_policy,
    make_policy,
    policy_class,
    policy_names,
    register_policy,
)

_INFRA = {"base"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _INFRA and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "EvictingKV",
    "KVPolicy",
    "KVPolicyParams",
    "LayerKV",
    "Rotary",
    "WindowKV",
    "describe_policy",
    "make_policy",
    "policy_class",
    "policy_names",
    "register_policy",
]
