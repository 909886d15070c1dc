"""Memory measurements: peak resident memory during a call, and KV-cache bytes.

Peak memory is the process's resident set size (RSS), sampled every 2 ms by a background thread
while the measured block runs, minus the RSS when it started: it covers every allocation torch
makes on the CPU (activations, scores, caches) but not memory freed and reused between samples.
KV-cache bytes are the bytes of the key and value tensors a cache holds.
"""

from __future__ import annotations

import threading
import time

import psutil

from attnsieve.methods.base import estimate_clock


class PeakRSS:
    """`with PeakRSS() as m: ...` then `m.peak_mb`: the largest RSS increase seen during the block."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._proc = psutil.Process()
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self):
        self._start = self._proc.memory_info().rss
        self._peak = self._start
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = (self._peak - self._start) / 2**20
        return False


def kv_cache_bytes(cache) -> int:
    """Bytes of the key/value tensors held by a transformers cache (0 for None)."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes"):  # attnsieve's policy caches count what their rows really hold
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


class AttentionTimer:
    """Wall-clock seconds spent inside a model's attention modules, by layer, while `on` is True.

    `with AttentionTimer(model) as t:` registers forward hooks on every attention module (removed on
    exit); set `t.on = True` around the calls to measure, read `t.seconds` ({layer: s}) and reset it
    with `t.seconds.clear()`. A module's time covers its projections, RoPE, the cache's update or
    store and the attention itself.
    """

    def __init__(self, model):
        from attnsieve.integrations.hf import _attention_modules

        self.modules = _attention_modules(model)
        self.on = False
        self.seconds: dict[int, float] = {}
        self._t0: dict[int, float] = {}
        self._handles: list = []

    def __enter__(self):
        for idx, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(self._pre(idx), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post(idx), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _pre(self, idx):
        def hook(module, args, kwargs):
            if self.on:
                self._t0[idx] = _clock(module)
        return hook

    def _post(self, idx):
        def hook(module, args, kwargs, output):
            if self.on and idx in self._t0:
                self.seconds[idx] = self.seconds.get(idx, 0.0) + _clock(module) - self._t0.pop(idx)
        return hook

    def total(self, layers=None) -> float:
        return sum(s for i, s in self.seconds.items() if layers is None or i in layers)


def _clock(module) -> float:
    """The wall clock, after the module's device finishes its queued kernels when it is a GPU (kernels
    are async: without this a GPU module's time would be its launches only). Only while measuring."""
    p = next(module.parameters(), None)
    return time.perf_counter() if p is None else estimate_clock(p)
