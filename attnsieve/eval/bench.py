"""Benchmarks: the block-sparse kernel against SDPA, and end-to-end prefill against stock SDPA.

Every timing is the median of `reps` runs after a warm-up, and every ratio compares two timings
taken in the same process on the same input (machines are shared and noisy; absolute seconds
are context only).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnsieve.kernels import exact_cells, support_attention
from attnsieve.kernels.block_sparse import resolve_backend
from attnsieve.methods import LayerContext, SparseMethod, has_param, make
from attnsieve.precision import dtype_name, kernel_path


def median_time(fn: Callable[[], object], reps: int, warmup: Callable[[], object] | None = None,
                device: torch.device | str | None = None) -> float:
    """Median seconds of `reps` calls after one warm-up; on CUDA each call is synchronised (kernels are async)."""
    cuda = device is not None and torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    (warmup or fn)()  # first calls pay one-off allocation, dispatch and compilation costs
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _dense_baseline(q, k, v, device: torch.device):
    """(causal SDPA call, its name): on CUDA the FlashAttention backend (keys repeated per query head
    beforehand, outside the timing, so every torch version's flash kernel takes it); on CPU torch's choice."""
    gqa = q.shape[1] != k.shape[1]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        rep = q.shape[1] // k.shape[1]
        kr, vr = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if gqa else (k, v)

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

        return flash, "sdpa-flash"
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)), "sdpa"


def _path(backend: str, dtype: torch.dtype, device: torch.device) -> dict:
    """kernel_path / why of a backend for the JSON row: eager flex is never reported as sparse."""
    if backend == "compiled":
        return kernel_path(dtype)
    if backend == "flex":
        where = "Triton on CUDA" if device.type == "cuda" else "C++ on this CPU (lse through a phantom key)"
        return {"kernel_path": "flex", "why": f"torch.compile'd FlexAttention, {where}: listed blocks only"}
    if backend == "flex-eager":
        return {"kernel_path": "flex-eager", "why": "eager FlexAttention computes the whole score matrix: not "
                                                    "sparse, for tests only (its cells count every score)"}
    return {"kernel_path": backend, "why": "backend requested"}


def bench_kernel(length: int, density: float, *, heads: int = 4, kv_heads: int = 1, head_dim: int = 256,
                 method: str = "block-topk", reps: int = 3, seed: int = 0, backend: str | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict:
    """Causal SDPA vs the method's support estimation + block-sparse attention, random inputs.

    Both sides run in `dtype` (float32 or bfloat16) on `device`, in the same process (on CUDA every
    timing is synchronised and SDPA runs its FlashAttention backend). `backend` picks the
    block-sparse kernel's backend (None: the fastest available; the JSON reports which ran, and
    `kernel_path` / `why` say whether bf16 ran on the CPU's bf16 units or was converted). With
    backend "flex" on CPU the compiled C++ kernel runs the same support in the same run
    (`compiled_s`, `flex_vs_compiled` = compiled time / flex time).
    """
    from attnsieve.models import resolve_device

    dev = resolve_device(device)
    if length < 64:
        raise ValueError(f"--length must be >= 64, got {length}")
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"--heads ({heads}) must be a positive multiple of --kv-heads ({kv_heads})")
    if not 1 <= head_dim <= 1024:
        raise ValueError(f"--head-dim must be in [1, 1024], got {head_dim}")
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    params = {"density": density} if has_param(method, "density") else {}
    m = make(method, **params)
    if not isinstance(m, SparseMethod):
        raise ValueError(f"method {method!r} does not estimate a support; choose a sparse method")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, head_dim, generator=g).to(dev, dtype)
    k = torch.randn(1, kv_heads, length, head_dim, generator=g).to(dev, dtype)
    v = torch.randn(1, kv_heads, length, head_dim, generator=g).to(dev, dtype)
    ctx = LayerContext(0, head_dim**-0.5)
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    backend = resolve_backend(backend, q.device, acc)
    dense, dense_name = _dense_baseline(q, k, v, dev)
    dense_s = median_time(dense, reps, device=dev)
    estimate_s = median_time(lambda: m.support(q, k, ctx), reps, device=dev)
    support = m.support(q, k, ctx)
    sparse_s = median_time(lambda: support_attention(q, k, v, support, scale=ctx.scale, backend=backend), reps,
                           device=dev)
    res = support_attention(q, k, v, support, scale=ctx.scale, backend=backend)
    row = {
        "length": length, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "method": method,
        "params": params, "backend": backend, "dtype": dtype_name(dtype), "device": str(dev),
        "dense": dense_name, **_path(backend, dtype, dev),
        "dense_s": dense_s, "sparse_s": sparse_s, "estimate_s": estimate_s,
        "speedup": dense_s / (sparse_s + estimate_s), "kernel_speedup": dense_s / sparse_s,
        "estimate_share": estimate_s / sparse_s,
        "measured_density": res.cells / (heads * exact_cells(length, length)),
    }
    if backend == "flex" and dev.type == "cpu":
        try:
            other = resolve_backend("compiled", dev, acc)
        except ValueError:
            other = None
        if other is not None:
            compiled_s = median_time(lambda: support_attention(q, k, v, support, scale=ctx.scale, backend=other),
                                     reps)
            ref = support_attention(q, k, v, support, scale=ctx.scale, backend=other)
            row.update(compiled_s=compiled_s, flex_vs_compiled=compiled_s / sparse_s,
                       compiled_max_abs_diff=float((ref.out.float() - res.out.float()).abs().max()))
    return row


@torch.no_grad()
def bench_prefill(model, tok, method: str, length: int, *, params: dict | None = None, reps: int = 1,
                  seed: int = 0, plan=None, backend: str | None = None) -> dict:
    """End-to-end prefill: stock SDPA, attnsieve's exact path and the method, same prompt.

    All three run in the model's own dtype, in this process; the row records it. With `plan` (a
    tuned attnsieve.tune.Plan) the plan runs instead of `method` (the row's method is "plan", and
    its `plan` field records which plan and its choices). `backend` is the patch's block-sparse backend.
    On CUDA every timing is synchronised.
    """
    from attnsieve.eval.tasks import make_passkey
    from attnsieve.integrations.hf import patched

    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    ids = make_passkey(tok, length, 0.5, seed).input_ids
    short = ids[:, : min(length, 512)]  # warm-up on a short prompt: a long one would double the cost

    ids = ids.to(model.device)
    short = short.to(model.device)

    def prefill(x=ids):
        model(x, use_cache=False, logits_to_keep=1)

    def warm():
        prefill(short)

    dev = model.device
    dense_s = median_time(prefill, reps, warm, device=dev)
    with patched(model, "dense", backend=backend):
        exact_s = median_time(prefill, reps, warm, device=dev)
    spec = {"plan": plan} if plan is not None else {"method": method, **(params or {})}
    with patched(model, **spec, backend=backend) as p:
        method_s = median_time(prefill, reps, warm, device=dev)
        p.stats.reset()
        prefill()
        density = p.stats.density()
    dtype = next(model.parameters()).dtype
    return {
        "length": length, "method": "plan" if plan is not None else method,
        "params": {} if plan is not None else params or {}, "plan": None if plan is None else plan.record(),
        "dtype": dtype_name(dtype),
        **kernel_path(dtype), "dense_s": dense_s, "exact_s": exact_s,
        "s": method_s, "speedup": dense_s / method_s, "exact_speedup": dense_s / exact_s, "density": density,
    }


@torch.no_grad()
def bench_decode(model, tok, kv: str, kv_budget: float | None, length: int, *, steps: int = 32,
                 method: str = "dense", params: dict | None = None, seed: int = 0, rounds: int = 4,
                 backend: str | None = None) -> dict:
    """One prefill of `length` tokens on each cache, then `steps` greedy decoding steps on each:
    transformers' DynamicCache (the model unpatched) against the policy's cache, interleaved.

    The steps run in `rounds` alternating blocks (DynamicCache, then the policy; the model is
    patched for the policy's blocks only), and `ms` / `dense_ms` are the medians of the blocks'
    per-step times, so a change in the machine's speed hits both alike. `attn_ms` / `dense_attn_ms`
    are the time per step inside the attention modules of all layers (projections, RoPE, the
    cache's update or store, and attention: the projections are the same on both sides, so the
    difference is the cache's), `global_attn_ms` / `dense_global_attn_ms` the same over the layers
    the policy compresses (a model's sliding-window layers keep their window on both sides).
    Bytes are the tensors each cache holds after the last step (for the policy: every row it
    really stores, metadata included).
    """
    from attnsieve.eval.efficiency import AttentionTimer
    from attnsieve.eval.tasks import make_passkey
    from attnsieve.integrations.hf import patched
    from attnsieve.integrations.hf_cache import PolicyCache

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    rounds = min(rounds, steps)
    ids = make_passkey(tok, length, 0.5, seed).input_ids.to(model.device)
    kw = dict(kv=kv, kv_budget=kv_budget, backend=backend, **(params or {}))

    def decode(timer, state, n):
        """n greedy steps continuing state = [cache, next token, tokens]: (seconds per step, attention s by layer)."""
        cache, nxt, tokens = state
        timer.seconds.clear()
        timer.on = True
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(nxt, cache=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
        dt = (time.perf_counter() - t0) / n
        timer.on = False
        state[1] = nxt
        return dt, {i: t / n for i, t in timer.seconds.items()}

    model(ids[:, : min(length, 256)], use_cache=True, logits_to_keep=1)  # warm-up
    out = model(ids, use_cache=True, logits_to_keep=1)
    dense = [out.cache, out.logits[:, -1].argmax(-1, keepdim=True), []]
    with patched(model, method, **kw):
        out = model(ids, use_cache=True, logits_to_keep=1)
    policy = [out.cache, out.logits[:, -1].argmax(-1, keepdim=True), []]
    cache = policy[0]
    if not isinstance(cache, PolicyCache):
        raise RuntimeError("internal error: the patched prefill did not build the policy's cache")
    global_layers = [i for i, layer in enumerate(cache.layers) if layer.kv.window is None]
    times = {"dense": [], "policy": []}
    attn = {"dense": [], "policy": []}
    cells = exact = 0
    sizes = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    with AttentionTimer(model) as timer:
        for n in sizes:
            dt, a = decode(timer, dense, n)
            times["dense"].append(dt)
            attn["dense"].append(a)
            with patched(model, method, **kw) as p:
                for layer in cache.layers:  # the cache continues under this patch (same policy and method)
                    layer.owner = p
                dt, a = decode(timer, policy, n)
                rs = [r for r in p.stats.records if r.role == "method" and r.phase == "decode"]
                cells += sum(r.cells for r in rs)
                exact += sum(r.exact_cells for r in rs)
            times["policy"].append(dt)
            attn["policy"].append(a)

    def med_attn(side, layers=None):
        return 1000 * statistics.median(sum(v for i, v in a.items() if layers is None or i in layers)
                                        for a in attn[side])

    dense_tokens, tokens = dense[2], policy[2]
    dense_cache = dense[0]
    dense_bytes = sum(
        (layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size())
        for layer in dense_cache.layers
    )
    agree = sum(a == b for a, b in zip(tokens, dense_tokens, strict=True)) / steps
    return {
        "length": length, "steps": steps, "rounds": rounds, "kv": kv, "kv_budget": kv_budget, "method": method,
        "params": params or {},
        "dense_ms": 1000 * statistics.median(times["dense"]), "ms": 1000 * statistics.median(times["policy"]),
        "dense_attn_ms": med_attn("dense"), "attn_ms": med_attn("policy"),
        "dense_global_attn_ms": med_attn("dense", global_layers), "global_attn_ms": med_attn("policy", global_layers),
        "global_layers": global_layers,
        "dense_bytes": dense_bytes, "bytes": cache.nbytes(),
        "dense_bytes_compressed_layers": cache.dense_nbytes(compressed_only=True),
        "bytes_compressed_layers": cache.nbytes(compressed_only=True),
        "bytes_ratio": cache.nbytes() / dense_bytes,
        "compressed_layers_ratio": cache.nbytes(compressed_only=True) / cache.dense_nbytes(compressed_only=True),
        "token_agreement": agree, "decode_density": cells / exact if exact else None,
    }


def plot_prefill(rows: list[dict], path) -> None:
    """Prefill time against prompt length: stock SDPA, attnsieve's exact path and the method, one
    colour per path and one line style per dtype (log-log axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"float32": "-", "bfloat16": "--"}
    colours = {"dense_s": "tab:gray", "exact_s": "tab:blue", "s": "tab:orange"}
    for dt in sorted({r["dtype"] for r in rows}):
        rs = sorted((r for r in rows if r["dtype"] == dt), key=lambda r: r["length"])
        lengths = [r["length"] for r in rs]
        name = (rs[0].get("plan") or {}).get("label", rs[0]["method"])
        for key, label in (("dense_s", "stock SDPA"), ("exact_s", "attnsieve exact"), ("s", name)):
            ax.plot(lengths, [r[key] for r in rs], styles.get(dt, ":"), marker="o", color=colours[key],
                    label=f"{label} ({dt})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("prefill time (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("prefill time against length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
