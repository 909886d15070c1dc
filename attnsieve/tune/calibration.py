"""Calibration prompts for the tuner: task prompts on seeds `eval` never uses, or the user's text files.

Every prompt comes with an answer span scored as eval scores it (the prompt prefilled alone, the
answer fed as a continuation): for a task prompt the task's answer text, for a text file the file's
own next `span` tokens after the prompt. Task prompts use seeds CALIB_SEED + seed + k, far from the
seeds eval uses (seed + sample index), and depths (k + 0.25) / n, between eval's (i + 0.5) / n.

Held-out prompts (`tune --validate`) are the opposite: exactly eval's inputs (seed + i, depth
(i + 0.5) / n per task and length) on the haystack the calibration did not use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnsieve.eval.tasks import HAYSTACKS, TASKS
from attnsieve.eval.tasks.base import encode

CALIB_SEED = 1_000_000  # eval's seeds are seed + i for a few samples i: calibration never meets them
FILE_SPAN = 16  # answer tokens taken from a text file after its prompt
MIN_PROMPT = 64  # shortest prompt (tokens) a text file may give


@dataclass
class CalibPrompt:
    name: str  # what the report prints: "passkey@4096 seed=1000000 depth=0.25"
    prompt_ids: torch.Tensor  # [1, P]
    answer_ids: list[int]  # the span whose next-token distributions are scored
    meta: dict = field(default_factory=dict)  # JSON-ready description for the plan's `calibration`
    answers: list[str] = field(default_factory=list)  # what a correct generation contains (task prompts)
    max_new_tokens: int = 0  # tokens generated to score it (0: not a task prompt, no accuracy)


def task_prompts(tok, tasks: list[str], lengths: list[int], n: int, haystack: str = "prose",
                 seed: int = 0) -> list[CalibPrompt]:
    """`n` prompts per length, cycling through `tasks`, depths (k + 0.25) / n, seeds CALIB_SEED + seed + k."""
    bad = sorted(set(tasks) - set(TASKS))
    if bad:
        raise ValueError(f"unknown calibration task(s) {', '.join(bad)}; choose from: {', '.join(TASKS)}")
    if n < 1:
        raise ValueError(f"--calib must be >= 1, got {n}")
    out = []
    for length in lengths:
        for k in range(n):
            task, depth, s = tasks[k % len(tasks)], (k + 0.25) / n, CALIB_SEED + seed + k
            name = f"{task}@{length} seed={s} depth={depth:.3g}"
            out.append(_task_prompt(tok, task, length, depth, s, haystack, name))
    return out


def _task_prompt(tok, task: str, length: int, depth: float, seed: int, haystack: str, name: str) -> CalibPrompt:
    """One task sample as a prompt: its answer (or its task's scoring target) is the scored span."""
    sample = TASKS[task](tok, length, depth, seed, haystack=haystack)
    target = sample.meta.get("target", " " + ", ".join(sample.answers))
    return CalibPrompt(name, sample.input_ids, encode(tok, target),
                       {"task": task, "length": length, "seed": seed, "depth": depth, "haystack": haystack},
                       list(sample.answers), sample.max_new_tokens)


def other_haystack(haystack: str) -> str:
    """The haystack held-out prompts use: the one the calibration did not."""
    return next(h for h in HAYSTACKS if h != haystack)


def heldout_prompts(tok, tasks: list[str], lengths: list[int], samples: int, haystack: str,
                    seed: int = 0) -> list[CalibPrompt]:
    """eval's own inputs: per task, length and sample i, seed `seed + i` and depth (i + 0.5) / samples."""
    bad = sorted(set(tasks) - set(TASKS))
    if bad:
        raise ValueError(f"unknown task(s) {', '.join(bad)}; choose from: {', '.join(TASKS)}")
    if samples < 1:
        raise ValueError(f"--validate-samples must be >= 1, got {samples}")
    out = []
    for task in tasks:
        for length in lengths:
            for i in range(samples):
                depth, s = (i + 0.5) / samples, seed + i
                name = f"{task}@{length} seed={s} depth={depth:.3g} {haystack}"
                out.append(_task_prompt(tok, task, length, depth, s, haystack, name))
    return out


def file_prompts(tok, files: list[Path], lengths: list[int], span: int = FILE_SPAN) -> list[CalibPrompt]:
    """Per file and length: its first `length` tokens as the prompt, the next `span` as the answer.

    A file shorter than length + span gives its whole text but the last `span` tokens as the prompt
    (once, however many lengths ask for more)."""
    out, seen = [], set()
    for path in files:
        text = read_text(path)
        ids = tok(text)["input_ids"]
        if len(ids) < MIN_PROMPT + span:
            raise ValueError(f"--prompt-file {str(path)!r} has {len(ids)} tokens; calibration needs at least "
                             f"{MIN_PROMPT + span} (a {MIN_PROMPT}-token prompt and a {span}-token answer)")
        for length in lengths:
            cut = min(length, len(ids) - span)
            if (path, cut) in seen:
                continue
            seen.add((path, cut))
            out.append(CalibPrompt(f"{path.name}@{cut}", torch.tensor([ids[:cut]]), list(ids[cut : cut + span]),
                                   {"file": str(path), "length": cut, "span": span}))
    return out


def read_text(path: Path) -> str:
    """The UTF-8 text of a prompt file, or a ValueError naming the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--prompt-file {str(path)!r} is a folder, not a file")
    if not path.exists():
        raise ValueError(f"--prompt-file {str(path)!r} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {str(path)!r} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})"
                         ) from None
    except OSError as e:
        raise ValueError(f"--prompt-file {str(path)!r} cannot be read: {e.strerror or e}") from None


def describe(prompts: list[CalibPrompt]) -> dict:
    """The plan's `calibration` field: how many prompts, their lengths, and each one's description."""
    return {"prompts": len(prompts), "lengths": sorted({int(p.prompt_ids.shape[1]) for p in prompts}),
            "answer_tokens": sum(len(p.answer_ids) for p in prompts), "items": [p.meta for p in prompts]}
