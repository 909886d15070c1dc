"""Evaluation: synthetic long-context tasks, measurement helpers and runners."""
