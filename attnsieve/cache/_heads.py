"""What DuoAttention and RazorAttention share: head scores on disk and a cache split by head.

A head-split layer keeps every token in its retrieval heads and only the first `sink` plus the
latest `recent(n)` tokens in the other (streaming) heads; rows are separate tensors, so the two
kinds really hold different lengths. Optionally (RazorAttention) each streaming row folds the
tokens it drops into one compensation token: the mean key and value of the dropped tokens, whose
exponentiated score counts once per dropped token (log n added to its logit).

Head scores come from `attnsieve.signals` (which runs the model: DuoAttention's retrieval
scores from the head profiles, RazorAttention's echo and induction scores); they are kept as JSON
under the attnsieve cache directory keyed by model and length, and the policies here only read
them and turn scores into retrieval-head sets. Nothing here runs a model, imports the integration
or the evaluation tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from attnsieve.cache.base import LayerKV, PastAttention
from attnsieve.kernels import merge


def model_key(name_or_path: str, cache_dir=None) -> str:
    """A stable key for a model: the embedded name, else the resolved path (the embedded folder maps back)."""
    from attnsieve.models import EMBEDDED, cache_root

    if name_or_path in EMBEDDED:
        return name_or_path
    path = Path(name_or_path).expanduser()
    if path.exists():
        for name in EMBEDDED:
            if path.resolve() == (cache_root(cache_dir) / name).resolve():
                return name
        return str(path.resolve())
    return name_or_path


def _stem(kind: str, key: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(key).name or key)[:40]
    return f"{kind}-{base}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def calibration_path(kind: str, key: str, length: int, cache_dir=None) -> Path:
    from attnsieve.models import cache_root

    return cache_root(cache_dir) / "calibration" / f"{_stem(kind, key)}-{length}.json"


def save_calibration(path: Path, doc: dict) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def find_calibration(kind: str, key: str, cache_dir=None) -> Path | None:
    """The cached calibration of `kind` for model `key` at the longest length, or None."""
    from attnsieve.models import cache_root

    folder = cache_root(cache_dir) / "calibration"
    found = []
    for p in folder.glob(f"{_stem(kind, key)}-*.json"):
        tail = p.stem.rsplit("-", 1)[-1]
        if tail.isdigit():
            found.append((int(tail), p))
    return max(found)[1] if found else None


def int_keys(scores: dict) -> dict[int, list[float]]:
    """JSON turns layer indices into strings; turn them back."""
    return {int(k): [float(x) for x in v] for k, v in scores.items()}


def load_calibration(kind: str, spec, how: str) -> dict:
    """A calibration document from a dict, a JSON file, or a model name/path whose cached calibration exists."""
    if isinstance(spec, dict):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"kv_calibration must be a dict, a JSON path or a model name, got {type(spec).__name__}")
    path = Path(spec).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"kv_calibration file {spec!r} does not exist; {how}")
        return json.loads(path.read_text())
    found = find_calibration(kind, model_key(spec))
    if found is None:
        raise ValueError(f"no cached {kind} calibration for model {spec!r}; {how}")
    return json.loads(found.read_text())


def top_heads(scores: dict[int, list[float]], count: int, exclude: set | None = None) -> set[tuple[int, int]]:
    """The `count` highest-scoring (layer, KV head) pairs across all layers (ties: lower layer, lower head)."""
    pairs = [(-s, layer, h) for layer, row in scores.items() for h, s in enumerate(row)
             if (layer, h) not in (exclude or set())]
    return {(layer, h) for _, layer, h in sorted(pairs)[: max(0, count)]}


def head_count(scores: dict[int, list[float]]) -> int:
    return sum(len(v) for v in scores.values())


# ----- the head-split cache ---------------------------------------------------------------------
class HeadSplitKV(LayerKV):
    """Retrieval heads keep everything; streaming heads keep `sink` first + `recent(n)` latest tokens."""

    def __init__(self, layer_idx: int, retrieval: set[int] | None, sink: int, recent: Callable[[int], int],
                 scores_for_layer: int | None = None, compensate: bool = False):
        super().__init__(layer_idx)
        self.retrieval = retrieval  # KV head indices kept whole (None: every head)
        self.sink, self.recent = sink, recent
        self.expected_heads = scores_for_layer  # KV heads the calibration saw in this layer
        self.compensate = compensate
        self.comp_k: list[torch.Tensor] = []  # per row, mean of the dropped keys [D] (empty before any drop)
        self.comp_v: list[torch.Tensor] = []
        self.comp_n: list[int] = []  # per row, tokens folded into the compensation token

    def _init(self, k, v):
        super()._init(k, v)
        if self.expected_heads is not None and self.expected_heads != self.Hkv:
            raise ValueError(
                f"the calibration has {self.expected_heads} KV heads for layer {self.layer_idx} but the model has "
                f"{self.Hkv}; calibrate this model"
            )
        n = self.B * self.Hkv
        self.comp_k = [k.new_zeros(0) for _ in range(n)]
        self.comp_v = [v.new_zeros(0) for _ in range(n)]
        self.comp_n = [0] * n

    def _held(self):
        return [*super()._held(), *self.comp_k, *self.comp_v]

    def nbytes(self):
        return super().nbytes() + 8 * sum(1 for n in self.comp_n if n)  # the int64 count of each compensation

    def is_retrieval(self, r: int) -> bool:
        return self.retrieval is None or (r % self.Hkv) in self.retrieval

    def compress(self, q, k_new, new_valid, scale):
        for r in range(len(self.pos)):
            if self.is_retrieval(r):
                continue
            L = self.pos[r].numel()
            keep_recent = self.recent(self.valid_host[r // self.Hkv])
            if L <= self.sink + keep_recent:
                continue
            lo, hi = self.sink, L - keep_recent  # dropped: stored indices [lo, hi)
            if self.compensate:
                self.fold(r, self.keys[r][lo:hi], self.values[r][lo:hi])
            for name in ("keys", "values", "pos"):
                rows = getattr(self, name)
                rows[r] = torch.cat([rows[r][:lo], rows[r][hi:]])

    def fold(self, r: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fold dropped tokens into row r's compensation token (running means of keys and values)."""
        n0, m = self.comp_n[r], k.shape[0]
        ks, vs = k.float().sum(0), v.float().sum(0)
        if n0:
            ks, vs = ks + self.comp_k[r].float() * n0, vs + self.comp_v[r].float() * n0
        self.comp_k[r], self.comp_v[r] = (ks / (n0 + m)).to(k.dtype), (vs / (n0 + m)).to(v.dtype)
        self.comp_n[r] = n0 + m

    def attend_past(self, q, scale, new_valid):
        past = super().attend_past(q, scale, new_valid)
        if not self.compensate or not any(self.comp_n):
            return past
        B, H, Tq, D = q.shape
        G = H // self.Hkv
        out = q.new_zeros(B, H, Tq, self.values[0].shape[-1])
        lse = torch.full((B, H, Tq), float("-inf"), device=q.device)
        cells = 0
        for r, n in enumerate(self.comp_n):
            if not n:
                continue
            b, h = divmod(r, self.Hkv)
            heads = slice(h * G, (h + 1) * G)
            logit = (q[b, heads].float() @ self.comp_k[r].float()) * scale + math.log(n)  # [G, Tq]
            if new_valid is not None:
                logit = logit.masked_fill(~new_valid[b].bool()[None, :], float("-inf"))
            lse[b, heads] = logit
            out[b, heads] = self.comp_v[r].to(out.dtype)
            cells += G * (Tq if new_valid is None else int(new_valid[b].sum()))
        comp = PastAttention(out, lse, cells)
        if past is None:
            return comp
        o, l = merge(past.out, past.lse.float(), comp.out, comp.lse)
        return PastAttention(o, l, past.cells + comp.cells)
