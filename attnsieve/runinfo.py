"""What every JSON that attnsieve prints or writes carries: versions, threads and seed."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def _v(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def run_info(seed: int | None) -> dict:
    import torch

    return {
        "versions": {
            "attnsieve": _v("attnsieve"),
            "torch": torch.__version__,
            "transformers": _v("transformers"),
            "python": platform.python_version(),
        },
        "threads": torch.get_num_threads(),
        "seed": seed,
    }
