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
