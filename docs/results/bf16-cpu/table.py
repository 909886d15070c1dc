"""Tables of docs/results/bf16-cpu (kernel rows, prefill16k.jsonl, prefill.jsonl) for the README.

python docs/results/bf16-cpu/table.py [KERNEL_FILE]  (from the repository root; the kernel rows
default to kernel-amx.jsonl, the current kernel's; kernel.jsonl and kernel-vnni.jsonl hold the
earlier kernels' rows)
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

here = Path(__file__).parent
runs = defaultdict(list)
kernel_file = here / (sys.argv[1] if len(sys.argv) > 1 else "kernel-amx.jsonl")
for line in kernel_file.read_text().splitlines():
    r = json.loads(line)
    runs[(r["dtype"], r["heads"], r["kv_heads"], r["head_dim"], r["length"], r["params"].get("density"))].append(r)

names = {(4, 1, 256): "4 / 1 KV, dim 256 (Gemma-3)", (9, 3, 64): "9 / 3 KV, dim 64 (SmolLM2)"}
print("| head shape | dtype | length | density | runs | SDPA s | estimate s | sparse s | speed-up (median, min-max) "
      "| kernel speed-up | measured density | path |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
order = sorted(runs.items(), key=lambda kv: (-kv[0][3], kv[0][5] == 1.0, kv[0][4], kv[0][0] != "bfloat16"))
for (dt, h, hkv, d, length, dens), rs in order:
    med = {key: statistics.median(r[key] for r in rs) for key in
           ("dense_s", "estimate_s", "sparse_s", "speedup", "kernel_speedup", "measured_density")}
    lo, hi = min(r["speedup"] for r in rs), max(r["speedup"] for r in rs)
    print(f"| {names[(h, hkv, d)]} | {dt} | {length} | {dens} | {len(rs)} | {med['dense_s']:.3f} "
          f"| {med['estimate_s']:.3f} | {med['sparse_s']:.3f} | {med['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) "
          f"| {med['kernel_speedup']:.2f}x | {med['measured_density']:.3f} | {rs[0]['kernel_path']} |")

print()
print("| length | dtype | stock SDPA s | attnsieve exact s | block-topk s | speed-up over SDPA | exact speed-up "
      "| measured density | rows |")
print("|---|---|---|---|---|---|---|---|---|")
rows = []
for name in ("prefill16k.jsonl", "prefill.jsonl"):
    path = here / name
    if path.exists():
        rows += [dict(json.loads(x), file=name) for x in path.read_text().splitlines() if x.strip()]
for r in sorted(rows, key=lambda r: (r["length"], r["dtype"], r["file"])):
    print(f"| {r['length']} | {r['dtype']} | {r['dense_s']:.2f} | {r['exact_s']:.2f} | {r['s']:.2f} "
          f"| {r['speedup']:.2f}x | {r['exact_speedup']:.2f}x | {r['density']:.3f} | {r['file']} |")
