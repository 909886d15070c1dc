"""The code base passes the linter configured in pyproject.toml."""

import shutil
import subprocess
from pathlib import Path

import pytest


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([ruff, "check", "attnsieve", "tests"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
