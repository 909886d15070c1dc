"""Synthetic long-context tasks, generated offline, deterministic for a seed, exact in token length."""

from attnsieve.eval.tasks.base import Sample, build_prompt, score_contains
from attnsieve.eval.tasks.passkey import make_passkey

TASKS = {"passkey": make_passkey}

__all__ = ["TASKS", "Sample", "build_prompt", "make_passkey", "score_contains"]
