"""Decoding-step cost of attnsieve's policy cache against a DynamicCache-style cache, Llama-3-8B shape.

    python benchmarks/kv_rows_decode.py [--length 4096] [--steps 20]

One layer, 8 KV heads x 128, 32 query heads, float32, batch 1: the policy cache's rows (one per KV
head) appended and read for attention as a decoding step does (`LayerKV.attend`), against
`torch.cat` appends plus SDPA (what transformers' DynamicCache does), interleaved, medians. Ratios
only: the machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnsieve.cache import LayerKV  # noqa: E402
from attnsieve.methods.base import AttnOutput  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    B, Hkv, G, L, D = 1, 8, 4, args.length, 128
    H, scale = Hkv * G, D**-0.5
    k0, v0, q0 = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, H, L, D)

    def prompt_attention(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return AttnOutput(out, 0)

    kv = LayerKV(0)
    kv.attend(q0, k0, v0, None, scale, prompt_attention)  # the prompt, stored
    K, V = k0.clone(), v0.clone()
    policy, dynamic = [], []
    for _ in range(args.steps):
        q, kn, vn = torch.randn(B, H, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
        t = time.perf_counter()
        kv.attend(q, kn, vn, None, scale, prompt_attention)
        policy.append(time.perf_counter() - t)
        t = time.perf_counter()
        K, V = torch.cat([K, kn], 2), torch.cat([V, vn], 2)
        torch.nn.functional.scaled_dot_product_attention(q, K, V, scale=scale, enable_gqa=True)
        dynamic.append(time.perf_counter() - t)
    p, d = statistics.median(policy), statistics.median(dynamic)
    print(f"length {L}: policy cache {p * 1e3:.2f} ms/step, DynamicCache-style {d * 1e3:.2f} ms/step, "
          f"ratio {p / d:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
