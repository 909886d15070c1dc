"""Precision: which dtype a command runs in, and which kernel path that dtype takes on this CPU.

`auto` means bf16 where the CPU has AMX bf16 tiles (read from its flags, never guessed) and
float32 elsewhere: on CPUs with AVX512-BF16 but no AMX, bf16 matrix products measured no faster
than float32's, so `auto` keeps float32 there. An explicit `bfloat16` always runs bf16, on any
CPU: the compiled kernels then compute natively in bf16 where oneDNN can drive the CPU's bf16
units, and convert to float32 where it cannot (`kernel_path` says which, and why).
"""

from __future__ import annotations

import torch

DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(name: str | torch.dtype | None, default: str = "float32") -> torch.dtype:
    """torch dtype for `--dtype NAME` (auto, float32, bfloat16); None means `default`."""
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {name}")
        return name
    name = default if name is None else name
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        from attnsieve.kernels.compiled import has_amx_bf16

        return torch.bfloat16 if has_amx_bf16() else torch.float32
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" / "bfloat16": the spelling every JSON row records."""
    return str(dtype).removeprefix("torch.")


def kernel_path(dtype: torch.dtype) -> dict:
    """Which path attnsieve's CPU kernels take for `dtype` here, and why (for benchmark JSON)."""
    from attnsieve.kernels import compiled

    amx = compiled.has_amx_bf16()
    if not compiled.available():
        return {"kernel_path": "torch", "why": "compiled CPU kernel unavailable (ATTNSIEVE_COMPILED=0, no compiler, "
                                                 "or not x86-64 Linux with MKL)"}
    if dtype == torch.bfloat16:
        if compiled.bf16_available():
            if compiled.amx_tiles():
                return {"kernel_path": "compiled-bf16", "why": "bf16 products on AMX bf16 tiles via attnsieve's own "
                                                               "tile kernels (oneDNN brgemm where a dim is not a "
                                                               "multiple of 32)"}
            units = "AMX bf16 tiles" if amx else "AVX512-BF16 (no AMX)"
            return {"kernel_path": "compiled-bf16", "why": f"bf16 products on {units} via oneDNN brgemm"}
        return {"kernel_path": "compiled-fp32", "why": "no bf16 matrix units: bf16 inputs converted to float32"}
    return {"kernel_path": "compiled-fp32", "why": "float32 requested: MKL sgemm"}
