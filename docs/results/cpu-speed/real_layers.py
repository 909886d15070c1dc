"""block-topk on the real global layers of gemma3-270m at 16k tokens.

q, k, v of every global layer are captured from one patched prefill of the pass-key prompt; then
SDPA, block-topk's support estimate and the sparse attention are timed alone on them (median of
3 after a warm-up), in the same process.

python docs/results/cpu-speed/real_layers.py   (from the repository root; about 2 minutes)
"""

import statistics
import time

import torch
import torch.nn.functional as F

import attnsieve
from attnsieve.eval.tasks import make_passkey
from attnsieve.kernels import exact_cells, support_attention
from attnsieve.methods.base import SparseMethod


def median_time(fn, reps=3):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    model, tok = attnsieve.load("gemma3-270m")
    ids = make_passkey(tok, 16384, 0.5, 0).input_ids
    captured = {}
    original = SparseMethod.prefill

    def record(self, q, k, v, ctx):
        captured.setdefault(ctx.layer_idx, (q.clone(), k.clone(), v.clone(), ctx))
        return original(self, q, k, v, ctx)

    SparseMethod.prefill = record
    try:
        with torch.no_grad(), attnsieve.patched(model, "block-topk", density=0.1):
            model(ids, use_cache=False, logits_to_keep=1)
    finally:
        SparseMethod.prefill = original

    method = attnsieve.methods.make("block-topk", density=0.1)
    for layer, (q, k, v, ctx) in sorted(captured.items()):
        support = method.support(q, k, ctx)
        est = median_time(lambda q=q, k=k, ctx=ctx: method.support(q, k, ctx))
        sparse = median_time(lambda q=q, k=k, v=v, s=support, ctx=ctx: support_attention(q, k, v, s, scale=ctx.scale))
        dense = median_time(
            lambda q=q, k=k, v=v, ctx=ctx: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=ctx.scale, enable_gqa=True
            )
        )
        res = support_attention(q, k, v, support, scale=ctx.scale)
        density = res.cells / (q.shape[1] * exact_cells(q.shape[2], k.shape[2]))
        print(f"layer {layer}: SDPA {dense:.3f} s, estimate {est:.3f} s, sparse {sparse:.3f} s, "
              f"estimate / sparse {est / sparse:.1%}, speed-up {dense / (est + sparse):.2f}x, density {density:.3f}")


if __name__ == "__main__":
    main()
