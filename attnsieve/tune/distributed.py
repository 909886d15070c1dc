"""The tuner's model work on a Ray cluster (optional extra `ray`): `tune --ray ADDRESS|auto|local`.

As `eval --ray` does, each worker is an actor that loads the model once (by name, in the tuning
dtype, one torch thread). A set of prompts is split into consecutive ranges, one per worker; each
worker keeps the dense references of its range (their captured layer inputs never leave it) and
profiles, verifies and answers on them. Results come back per prompt (profiles as consecutive
ranges) and are combined in prompt order, so errors, cells, KL and top-1 are the in-process ones;
measured seconds are the workers' own (one thread each).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnsieve.eval.distributed import _ray
from attnsieve.tune.calibration import CalibPrompt
from attnsieve.tune.plan import LayerChoice
from attnsieve.tune.pool import RefInfo
from attnsieve.tune.profile import Candidate, Profile, merge


class RayPool:
    """Workers on Ray; `address` is a cluster address, "auto", or "local" (a Ray instance started here)."""

    def __init__(self, address: str, model: str, dtype: str, workers: int | None = None):
        from transformers import AutoConfig

        from attnsieve.models import resolve

        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=None if address == "local" else address, include_dashboard=False,
                         log_to_driver=False, ignore_reinit_error=True)
            except (ConnectionError, RuntimeError) as e:  # no cluster at that address
                raise ValueError(f"--ray {address!r}: cannot reach a Ray cluster ({e})") from None
        self.ray, self.model_name, self.dtype = ray, model, getattr(torch, dtype)
        self.config = AutoConfig.from_pretrained(resolve(model), local_files_only=True)
        self.n = workers or max(1, int(ray.available_resources().get("CPU", 1)))
        self.actors: list = []
        self.ranges: dict[str, list[tuple[object, int]]] = {}  # set name -> (actor, number of prompts) in order

    def _pool(self, k: int) -> list:
        ray = self.ray

        @ray.remote(num_cpus=1)
        class Worker:
            def __init__(self, model_name: str, dtype: str):
                torch.set_num_threads(1)
                from attnsieve.models import load
                from attnsieve.tune.pool import LocalPool

                self.pool = LocalPool(*load(model_name, dtype=dtype))

            def call(self, op: str, *args):
                return getattr(self.pool, op)(*args)

        while len(self.actors) < k:
            self.actors.append(Worker.remote(self.model_name, str(self.dtype).removeprefix("torch.")))
        return self.actors[:k]

    def _each(self, name: str, op: str, *args) -> list:
        """`op(name, *args)` on every worker holding part of set `name`, results in prompt order."""
        return self.ray.get([actor.call.remote(op, name, *args) for actor, _ in self.ranges[name]])

    def references(self, name: str, prompts: list[CalibPrompt], progress: Callable[[str], None] | None = None,
                   what: str = "dense reference") -> list[RefInfo]:
        k = min(self.n, len(prompts))
        actors = self._pool(k)
        size, extra = divmod(len(prompts), k)
        chunks, start = [], 0
        for i in range(k):  # consecutive ranges, the first `extra` one prompt longer
            end = start + size + (i < extra)
            chunks.append(prompts[start:end])
            start = end
        self.ranges[name] = [(a, len(c)) for a, c in zip(actors, chunks, strict=True)]
        refs = [a.call.remote("references", name, c) for a, c in zip(actors, chunks, strict=True)]
        out = []
        for chunk, ref in zip(chunks, refs, strict=True):
            infos = self.ray.get(ref)
            for p in chunk:
                if progress:
                    progress(f"{what}: {p.name} (Ray)")
            out.extend(infos)
        return out

    def profile(self, name: str, candidates: list[Candidate], reps: int, per_head: bool,
                progress: Callable[[str], None] | None = None) -> Profile:
        parts = self._each(name, "profile", candidates, reps, per_head)
        if progress:
            units = len(parts[0].table)
            for _, count in self.ranges[name]:
                for _ in range(count * units * len(parts[0].candidates)):
                    progress("profile (Ray)")
        return merge(parts)

    def verify(self, name: str, layers: dict[int, LayerChoice]) -> list[dict]:
        return [row for rows in self._each(name, "verify", layers) for row in rows]

    def answers(self, name: str, layers: dict[int, LayerChoice] | None) -> list[float]:
        return [s for scores in self._each(name, "answers", layers) for s in scores]

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors.clear()
