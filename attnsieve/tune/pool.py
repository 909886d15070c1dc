"""Where the tuner's model work runs: this process (`LocalPool`), or Ray actors (`distributed.RayPool`).

A pool holds named sets of prompts ("calib", "heldout") with their dense references, and runs on
them what needs the model: profiling every candidate on the captured layer inputs, verifying a plan
(full forwards: KL, top-1, cells per prompt), and greedy answers. Results come back per prompt, in
prompt order, so the tuner combines them the same way wherever they ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from attnsieve.eval.fidelity import DenseReference, dense_reference
from attnsieve.eval.generation import greedy
from attnsieve.eval.tasks import score_contains
from attnsieve.integrations.hf import patched
from attnsieve.tune.calibration import CalibPrompt
from attnsieve.tune.plan import LayerChoice
from attnsieve.tune.profile import Candidate, Profile, profile
from attnsieve.tune.verify import verify_rows


@dataclass
class RefInfo:
    """What the driver needs of one dense reference (the captures stay where they were made)."""

    layers: list[int]  # the global layers captured
    heads: int  # query heads per layer
    prefill_s: float  # the exact path's prompt prefill


class LocalPool:
    """The model in this process (`tok` is needed for greedy answers only)."""

    def __init__(self, model, tok=None):
        self.model, self.tok = model, tok
        self.refs: dict[str, list[DenseReference]] = {}
        self.prompts: dict[str, list[CalibPrompt]] = {}

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def references(self, name: str, prompts: list[CalibPrompt], progress: Callable[[str], None] | None = None,
                   what: str = "dense reference") -> list[RefInfo]:
        refs = []
        for p in prompts:
            if progress:
                progress(f"{what}: {p.name}")
            refs.append(dense_reference(self.model, p.prompt_ids, p.answer_ids))
        self.refs[name], self.prompts[name] = refs, list(prompts)
        return [_info(r) for r in refs]

    def profile(self, name: str, candidates: list[Candidate], reps: int, per_head: bool,
                progress: Callable[[str], None] | None = None) -> Profile:
        return profile(self.refs[name], candidates, reps=reps, per_head=per_head, progress=progress)

    def verify(self, name: str, layers: dict[int, LayerChoice]) -> list[dict]:
        return verify_rows(self.model, self.refs[name], {i: c.make() for i, c in layers.items()})

    def answers(self, name: str, layers: dict[int, LayerChoice] | None) -> list[float]:
        """Per prompt, the RULER score of the greedy answer with `layers` patched in (None: dense)."""
        if self.tok is None:
            raise ValueError("greedy answers need the tokenizer")
        scores = []
        spec = None if layers is None else {i: c.make() for i, c in layers.items()}
        with patched(self.model, "dense", layers=spec):
            for p in self.prompts[name]:
                gen = greedy(self.model, self.tok, p.prompt_ids, p.max_new_tokens)
                scores.append(score_contains(gen.text, p.answers))
        return scores

    def close(self) -> None:
        self.refs.clear()


def _info(r: DenseReference) -> RefInfo:
    heads = next(iter(r.layers.values())).q.shape[1] if r.layers else 0
    return RefInfo(sorted(r.layers), heads, r.prefill_s or 0.0)
