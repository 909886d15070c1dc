"""transformers' side of attnsieve's KV caches: a `Cache` whose layers hold a policy's compressed past.

Each cache layer's `update` does not concatenate: it hands the new keys/values through unchanged
and puts itself into the kwargs dict that reaches attnsieve's attention function, which then asks
the layer (`LayerKV.attend`) for attention over stored past + new tokens and lets it store and
compress the new tokens. The cache reports tokens *seen* from `get_seq_length()` (so `generate`
keeps positions right) and only the new tokens from `get_mask_sizes()` (the mask function then
returns the new tokens' padding mask; the past's padding was never stored).
This module lives beside hf.py and, like it, is where transformers is imported.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from attnsieve.cache import KVPolicy, LayerKV, WindowKV

KV_KWARG = "attnsieve_kv_layer"


class PolicyCacheLayer(CacheLayerMixin):
    """One layer of an attnsieve cache: a thin adapter around a pure-tensor LayerKV."""

    is_compileable = False
    is_croppable = False

    def __init__(self, kv: LayerKV, owner=None):
        super().__init__()
        self.kv = kv
        self.owner = owner  # the Patch that made this cache (None: not tied to one)
        self.is_sliding = kv.window is not None
        self.sliding_window = kv.window

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.owner is not None and not self.owner.active:
            raise RuntimeError(
                "attnsieve.unpatch() was called while this KV-policy cache was in use (e.g. during generate); "
                "it holds only the policy's compressed past, which the unpatched model cannot read. "
                "Unpatch after generate returns, or start a new generation"
            )
        self.is_initialized = True
        extra = kwargs.get("kwargs")
        if isinstance(extra, dict):
            extra[KV_KWARG] = self
        else:
            raise RuntimeError(
                "this transformers model does not pass its attention kwargs to the cache; "
                "attnsieve's KV-cache policies need transformers >= 5.24"
            )
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return self.kv.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("attnsieve caches are single-use: build a new one with Patch.new_cache()")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search is not supported with attnsieve KV-cache policies")

    @property
    def keys(self):  # transformers' generic byte counters read .keys/.values; report the stored rows
        return None

    @keys.setter
    def keys(self, value):
        pass

    @property
    def values(self):
        return None

    @values.setter
    def values(self, value):
        pass


class PolicyCache(Cache):
    """A transformers Cache whose global layers follow a KV policy and sliding layers keep their window."""

    def __init__(self, policy: KVPolicy | None, n_layers: int, windows: dict[int, int | None], owner=None):
        layers = []
        global_rank = 0
        for i in range(n_layers):
            w = windows.get(i)
            if w is not None:
                kv = WindowKV(i, w)
            elif policy is None:
                kv = LayerKV(i)
            else:
                kv = policy.layer(i, global_rank)
                global_rank += 1
            layers.append(PolicyCacheLayer(kv, owner))
        super().__init__(layers=layers)
        self.policy = policy

    def freeze(self) -> None:
        """Query-agnostic mode: what is stored now (a context, compressed by the policy) stays as it is,
        and every later token (a question, an answer, the next question) is stored as it comes, with
        no further compression, so nothing the policy kept depends on a question. Sliding-window layers
        keep dropping what leaves their window."""
        for layer in self.layers:
            if not isinstance(layer.kv, WindowKV):
                layer.kv.frozen = True

    def nbytes(self, compressed_only: bool = False) -> int:
        """Bytes this cache holds; `compressed_only` counts only the layers the policy compresses."""
        return sum(
            layer.kv.nbytes() for layer in self.layers if not (compressed_only and isinstance(layer.kv, WindowKV))
        )

    def dense_nbytes(self, compressed_only: bool = False) -> int:
        """Bytes transformers' DynamicCache would hold for the same tokens."""
        return sum(
            layer.kv.dense_nbytes()
            for layer in self.layers
            if not (compressed_only and isinstance(layer.kv, WindowKV))
        )

    def stored_tokens(self) -> dict[int, torch.Tensor]:
        """Per layer, [B, Hkv] tokens stored."""
        return {i: layer.kv.stored_tokens() for i, layer in enumerate(self.layers) if layer.kv.keys}
