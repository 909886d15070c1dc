"""Table of the paper-faithful prefill runs (results*.jsonl in this folder) for the README.

python docs/results/prefill-paper-4k/table.py  (from the repository root)
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

here = Path(__file__).parent
rows = defaultdict(list)
for path in sorted(here.glob("results*.jsonl")):
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows[(r["task"], r["haystack"], r["config"], r["causal"])].append(r)

print("| task (haystack) | config | causal | found | measured density | KL(dense‖method) | top-1 | mass covered |")
print("|---|---|---|---|---|---|---|---|")
for (task, hay, config, causal), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][2] != "dense", kv[0][2])):
    found = sum(r["correct"] for r in rs)
    med = {k: statistics.mean(r[k] for r in rs) for k in ("density", "kl", "top1_agree", "mass_covered")}
    print(f"| {task} ({hay}) | `{config}` | {str(causal).lower()} | {found:g}/{len(rs)} | {med['density']:.3f} "
          f"| {med['kl']:.3f} | {med['top1_agree']:.2f} | {med['mass_covered']:.3f} |")
