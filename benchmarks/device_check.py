"""GPU consistency check for the pure-torch kernels and methods (run by hand where a GPU exists).

The kernels are device-agnostic torch code; CI has no GPU. This script checks that the
block-sparse kernel and every registered method give the same result on CUDA as the slow
reference, then times dense SDPA against the block-sparse kernel on one long input, both in the
same run. It prints a table and one JSON line last.
"""

from __future__ import annotations

import json
import sys
import time

import torch

sys.path.insert(0, ".")
from attnsieve.kernels import BlockSupport, block_grid, block_sparse_attention, dense_attention  # noqa: E402
from attnsieve.methods import LayerContext, describe, make, method_class, names  # noqa: E402


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main():
    dev = "cuda"
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}}
    g = torch.Generator(device=dev).manual_seed(0)
    for H, Hkv, T in [(4, 1, 1000), (9, 3, 777), (8, 8, 64)]:
        q = torch.randn(2, H, T, 64, device=dev, generator=g)
        k = torch.randn(2, Hkv, T, 64, device=dev, generator=g)
        v = torch.randn(2, Hkv, T, 64, device=dev, generator=g)
        first, n_q, n_k = block_grid(T, T, 64)
        mask = torch.rand(2, Hkv, n_q, n_k, device=dev, generator=g) < 0.3
        mask |= torch.eye(n_q, n_k, dtype=torch.bool, device=dev)
        res = block_sparse_attention(q, k, v, BlockSupport.from_mask(mask, 64))
        full = BlockSupport.from_mask(torch.ones_like(mask), 64)
        ref, _ = dense_attention(q, k, v)
        err_full = (block_sparse_attention(q, k, v, full).out - ref).abs().max().item()
        cpu = block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), BlockSupport.from_mask(mask.cpu(), 64))
        err_cpu = (res.out.cpu() - cpu.out).abs().max().item()
        results["checks"][f"kernel H{H}/{Hkv} T{T}"] = {"full_vs_dense": err_full, "cuda_vs_cpu": err_cpu}
        for name in names():
            exact = method_class(name).exact_params
            if exact is None:
                continue
            params = {**exact, **({"block_size": 32} if "block_size" in describe(name)["params"] else {})}
            out = make(name, **params).prefill(q, k, v, LayerContext(0, 64**-0.5)).out
            results["checks"][f"{name} exact H{H}/{Hkv} T{T}"] = {"vs_dense": (out - ref).abs().max().item()}

    H, Hkv, T, D = 4, 1, 16384, 256  # the Gemma-3 head shape
    q = torch.randn(1, H, T, D, device=dev, generator=g)
    k = torch.randn(1, Hkv, T, D, device=dev, generator=g)
    v = torch.randn(1, Hkv, T, D, device=dev, generator=g)
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    m = make("block-topk", density=0.1)
    ctx = LayerContext(0, D**-0.5)
    est = timed(lambda: m.support(q, k, ctx), reps=3)
    sup = m.support(q, k, ctx)
    sparse = timed(lambda: block_sparse_attention(q, k, v, sup), reps=3)
    results["timing_16k_gemma_shape"] = {"sdpa_s": sdpa, "block_topk_estimate_s": est, "block_sparse_s": sparse}
    worst = max(max(v.values()) for v in results["checks"].values())
    results["worst_abs_err"] = worst
    for key, val in results["checks"].items():
        print(f"{key:40s} " + " ".join(f"{k}={x:.2e}" for k, x in val.items()))
    print(json.dumps(results))
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
