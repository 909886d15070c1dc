"""Many small matrix products read straight from tensor memory, through MKL's batched GEMM.

torch's x86-64 wheels link Intel MKL into `libtorch_cpu` and export its CBLAS interface, including
`cblas_sgemm_batch` / `cblas_dgemm_batch`: one call runs any number of small products, each with
its own pointers into existing buffers. The block-sparse kernel uses this to multiply a query
block by exactly the key blocks its support names *in place*, with no gathered copy of the keys
or values, and MKL spreads the products over the cores.

Every call is bounds-checked in Python before it reaches MKL: each product's first and last
element must lie inside its tensor, so a wrong offset raises a ValueError instead of touching
foreign memory. Where the library or the symbol is missing (non-x86 wheels, other BLAS builds)
`available()` is False and callers use their pure-torch path.
"""

from __future__ import annotations

import ctypes
import glob
import os
from functools import lru_cache

import torch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@lru_cache(maxsize=1)
def _lib():
    """The loaded library exporting MKL's batched GEMMs, or None."""
    if not torch.backends.mkl.is_available():
        return None
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(lib_dir, "*torch_cpu*"))):
        try:
            lib = ctypes.CDLL(path)
            fns = {torch.float32: lib.cblas_sgemm_batch, torch.float64: lib.cblas_dgemm_batch}
        except (OSError, AttributeError):
            continue
        for fn in fns.values():
            fn.restype = None
        return fns
    return None


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether batched GEMMs on `dtype` CPU tensors can run here."""
    fns = _lib()
    return fns is not None and dtype in fns


def _check(name: str, t: torch.Tensor, off: torch.Tensor, rows: int, cols: int, ld: int) -> None:
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{name} must be a contiguous CPU tensor")
    if cols > ld:
        raise ValueError(f"{name}: leading dimension {ld} is smaller than the {cols} columns read")
    if off.numel():
        lo, hi = int(off.min()), int(off.max())
        last = hi + (rows - 1) * ld + cols  # one past the last element a product touches
        if lo < 0 or last > t.numel():
            raise ValueError(f"{name}: offsets span [{lo}, {last}) outside the tensor's {t.numel()} elements")


def gemm_batch(
    a: torch.Tensor, a_off: torch.Tensor, lda: int,
    b: torch.Tensor, b_off: torch.Tensor, ldb: int,
    c: torch.Tensor, c_off: torch.Tensor, ldc: int,
    m: int, n: int, k: int, *, trans_b: bool, beta: float = 0.0, alpha: float = 1.0,
) -> None:
    """For every i: C_i = alpha * A_i @ op(B_i) + beta * C_i, all row-major, in one MKL call.

    A_i is the m x k matrix starting at element a_off[i] of `a` with row stride lda; B_i is
    k x n (or, with trans_b, n x k read transposed) at b_off[i] of `b`; C_i is m x n at c_off[i]
    of `c`. Offsets are int64 element offsets. The C_i of one call must not overlap (MKL may run
    them in parallel). a, b, c share one dtype (float32 or float64) and must be contiguous.
    """
    fns = _lib()
    if fns is None or a.dtype not in fns:
        raise ValueError(f"batched MKL GEMM is not available for {a.dtype} here; use the torch path")
    if not (a.dtype == b.dtype == c.dtype):
        raise ValueError(f"dtypes differ: {a.dtype}, {b.dtype}, {c.dtype}")
    count = a_off.numel()
    if not (b_off.numel() == c_off.numel() == count):
        raise ValueError(f"offset counts differ: {count}, {b_off.numel()}, {c_off.numel()}")
    if count == 0:
        return
    if max(m, n, k, count) >= 2**31:
        raise ValueError(f"GEMM sizes must fit in int32, got m={m}, n={n}, k={k}, count={count}")
    _check("A", a, a_off, m, k, lda)
    _check("B", b, b_off, n if trans_b else k, k if trans_b else n, ldb)
    _check("C", c, c_off, m, n, ldc)
    size = a.element_size()
    ptrs = [
        (t.data_ptr() + off.to(torch.int64) * size).contiguous() for t, off in ((a, a_off), (b, b_off), (c, c_off))
    ]
    real = ctypes.c_float if a.dtype == torch.float32 else ctypes.c_double
    i1 = ctypes.c_int * 1
    fns[a.dtype](
        _ROW_MAJOR, i1(_NO_TRANS), i1(_TRANS if trans_b else _NO_TRANS), i1(m), i1(n), i1(k),
        (real * 1)(alpha), ctypes.c_void_p(ptrs[0].data_ptr()), i1(lda),
        ctypes.c_void_p(ptrs[1].data_ptr()), i1(ldb), (real * 1)(beta),
        ctypes.c_void_p(ptrs[2].data_ptr()), i1(ldc), 1, i1(count),
    )
