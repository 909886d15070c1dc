"""Host syncs each method would make on a GPU, counted on the CPU (attnsieve.kernels.host_syncs).

    python benchmarks/host_syncs_table.py > docs/results/host-syncs/table.md

Per registered method: sparse methods' support() at 1k and 8k tokens, at their defaults and at
density 0.1 (B=1, 4 query / 2 KV heads x 32, float32, random q/k); methods with their own prefill:
prefill() at 1k and 4k with the token route a GPU takes. Deterministic (seeded), so one run is the
result. The counts are a simulation: `benchmarks/device_check.py` measures CUDA's own on a GPU.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnsieve.kernels.host_syncs import count_host_syncs  # noqa: E402
from attnsieve.methods import LayerContext, SparseMethod, describe, make, method_class, names  # noqa: E402
from attnsieve.methods.block_topk import BlockTopK  # noqa: E402


def count(name: str, T: int, prefill: bool, **kw) -> int | str:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, T, 32, generator=g), torch.randn(1, 2, T, 32, generator=g), \
        torch.randn(1, 2, T, 32, generator=g)
    try:
        m = make(name, **kw)
        with count_host_syncs(q, k, v) as s:
            if prefill:
                m.prefill(q, k, v, LayerContext(0, 32**-0.5))
            else:
                m.support(q, k, LayerContext(0, 32**-0.5))
        return s.count
    except ValueError as e:  # a method that refuses this layer (non-causal)
        return f"refuses: {str(e).split(';')[0]}"


def main() -> int:
    BlockTopK.use_compiled = False  # the torch planner a GPU runs
    importlib.import_module("attnsieve.kernels.support_attention")._token_kernel_compiled = lambda q: False
    print("| method | call | 1k, defaults | 8k (4k*), defaults | 1k, density 0.1 | 8k (4k*), density 0.1 |")
    print("|---|---|---|---|---|---|")
    for name in names():
        if name == "dense":
            continue
        sparse = issubclass(method_class(name), SparseMethod)
        long = 8192 if sparse else 4096
        dens = "density" in describe(name)["params"]
        cells = [count(name, 1024, not sparse), count(name, long, not sparse)]
        cells += [count(name, 1024, not sparse, density=0.1), count(name, long, not sparse, density=0.1)] if dens \
            else ["-", "-"]
        call = "support()" if sparse else "prefill()*"
        print(f"| {name} | {call} | " + " | ".join(str(c) for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
