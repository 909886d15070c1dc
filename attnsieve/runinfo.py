"""What every JSON that attnsieve prints or writes carries: versions, threads, seed, dtype, device."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def _v(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def run_info(seed: int | None, dtype=None, device: str = "cpu") -> dict:
    """`dtype` is the torch dtype (or its name) the command computed in; None where none applies."""
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
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "device": device,
    }
