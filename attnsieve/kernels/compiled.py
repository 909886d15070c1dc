"""attnsieve's compiled CPU kernel: built on first use, optional, never required.

The fused block-sparse kernel (`csrc/block_sparse_cpu.cpp`) is compiled with
`torch.utils.cpp_extension` the first time it is needed (about a minute; needs a C++ compiler and
MKL inside torch, which torch's x86-64 wheels carry). The build is cached under attnsieve's cache
directory, keyed by the source, the torch version and this CPU's instruction-set flags, so a
cache shared between different machines never runs code built for another CPU.

Set ATTNSIEVE_COMPILED=0 to never build or load it; every caller then uses a pure-torch path.
If the build fails, a warning says why once and the pure-torch paths run.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from attnsieve.kernels import mkl_batch

SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]


def _cpu_signature() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    return flags


def _build_dir() -> Path:
    parts = [SOURCE.read_text(), torch.__version__, sys.version, platform.machine(), _cpu_signature(), *FLAGS]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    root = Path(os.environ.get("ATTNSIEVE_CACHE") or Path.home() / ".cache" / "attnsieve").expanduser()
    path = root / "build" / f"block_sparse_cpu-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@lru_cache(maxsize=1)
def module():
    """The compiled extension module, or None (disabled, unsupported platform or failed build)."""
    if os.environ.get("ATTNSIEVE_COMPILED", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64") or not mkl_batch.available():
        return None  # the kernel calls MKL's sgemm exported by torch's x86-64 builds
    try:
        from torch.utils import cpp_extension

        try:  # the `ninja` wheel's binary, which may not be on PATH (pyenv, unactivated venvs)
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass
        build_dir = _build_dir()
        if not any(build_dir.glob("*.so")):
            print("attnsieve: compiling the CPU block-sparse kernel (once per machine, about a minute)...",
                  file=sys.stderr, flush=True)
        return cpp_extension.load(
            name="attnsieve_block_sparse_cpu",
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        warnings.warn(f"attnsieve: compiled CPU kernel unavailable ({type(exc).__name__}: {exc}); "
                      "using the pure-torch kernels", stacklevel=2)
        return None


def available() -> bool:
    return module() is not None
