"""attnsieve's compiled CPU kernels: built on first use, optional, never required.

`csrc/block_sparse_cpu.cpp` (the block-sparse kernel, block-topk's planner and the token-gather
kernel) is compiled with `torch.utils.cpp_extension` the first time it is needed (about 20 s on
the development machine; needs a C++ compiler and the MKL inside torch's x86-64 wheels). The
kernels run float32 through MKL's sgemm and bf16 through oneDNN's batch-reduce GEMM on the CPU's
bf16 matrix units (AMX, AVX512-BF16) where oneDNN supports them (`bf16_available`). The
build is cached under attnsieve's cache directory, keyed by the source, the torch and Python
versions and this CPU's instruction-set flags, so a cache shared between different machines never
runs code built for another CPU.

Set ATTNSIEVE_COMPILED=0 to never build or load it; callers then run their other backends (MKL
batched GEMMs through ctypes, torch's flash op, plain torch). If the build fails, a warning says
why once and the same fallbacks run.
"""

from __future__ import annotations

import hashlib
import logging
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
    # the source's path too: ninja records it, so two checkouts sharing one cache would otherwise
    # rebuild each other's extension on every load
    parts = [SOURCE.read_text(), str(SOURCE.resolve()), torch.__version__, sys.version, platform.machine(),
             _cpu_signature(), *FLAGS]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    root = Path(os.environ.get("ATTNSIEVE_CACHE") or Path.home() / ".cache" / "attnsieve").expanduser()
    path = root / "build" / f"block_sparse_cpu-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class _CpuOnlyBuild(logging.Filter):
    """Drops cpp_extension's "No CUDA runtime is found, using CUDA_HOME=..." notice, logged when it is
    imported on a machine without a GPU: this extension is C++ only and never uses CUDA_HOME, so on a
    CPU-only machine the notice is noise that reads like an error. Every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _import_cpp_extension():
    """torch.utils.cpp_extension, imported without its CUDA_HOME notice on a CPU-only machine (see
    _CpuOnlyBuild); where torch sees a GPU nothing is filtered."""
    if torch.cuda.is_available():
        from torch.utils import cpp_extension

        return cpp_extension
    log = logging.getLogger("torch.utils.cpp_extension")
    quiet = _CpuOnlyBuild()
    log.addFilter(quiet)
    try:
        from torch.utils import cpp_extension
    finally:
        log.removeFilter(quiet)
    return cpp_extension


@lru_cache(maxsize=1)
def module():
    """The compiled extension module, or None (disabled, unsupported platform or failed build)."""
    if os.environ.get("ATTNSIEVE_COMPILED", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64") or not mkl_batch.available():
        return None  # the kernel calls MKL's sgemm exported by torch's x86-64 builds
    try:
        cpp_extension = _import_cpp_extension()

        try:  # the `ninja` wheel's binary, which may not be on PATH (pyenv, unactivated venvs)
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass
        build_dir = _build_dir()
        if not any(build_dir.glob("*.so")):
            print("attnsieve: compiling the CPU kernels (once per machine and version, under a minute)...",
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


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags as /proc/cpuinfo lists them (empty where unreadable)."""
    sig = _cpu_signature()
    return set(sig.split(":", 1)[1].split()) if ":" in sig else set()


def has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 tiles (the `amx_bf16` flag); read from the flags, not guessed."""
    return "amx_bf16" in cpu_flags()


@lru_cache(maxsize=1)
def bf16_available() -> bool:
    """Whether the compiled kernels run bf16 natively here (oneDNN packs bf16 for the CPU's matrix units).

    Where this is False, bf16 inputs are converted to float32 for the compiled kernels.
    """
    mod = module()
    return mod is not None and bool(mod.bf16_supported())


def amx_tiles() -> bool:
    """Whether the bf16 engine runs attnsieve's own AMX tile kernels here: the CPU has AMX bf16 tiles,
    Linux grants the process the tile state, and ATTNSIEVE_AMX is not "0". Calls whose block size,
    head and value dims are multiples of 32 use them; other bf16 calls, and every call where this is
    False, run oneDNN's brgemm (AVX512-BF16 or AMX). Read per call, like the environment variable."""
    mod = module()
    return mod is not None and bool(mod.bf16_supported()) and bool(mod.amx_tiles())


def native_dtype(dtype: torch.dtype, block_size: int, head_dim: int, value_dim: int) -> torch.dtype:
    """The dtype the compiled kernels compute a call in: bf16 natively where they can, else float32."""
    if (dtype == torch.bfloat16 and bf16_available() and block_size % 16 == 0 and value_dim % 16 == 0
            and head_dim % 2 == 0):
        return torch.bfloat16
    return torch.float32
