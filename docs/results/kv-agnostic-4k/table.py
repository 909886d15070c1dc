"""Query-aware against query-agnostic KV compression, side by side, from results.jsonl.

python docs/results/kv-agnostic-4k/table.py  (from the repository root)
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

here = Path(__file__).parent
rows = [json.loads(x) for x in (here / "results.jsonl").read_text().splitlines() if x.strip()]
by = defaultdict(list)
for r in rows:
    by[(r["kv"], r["kv_budget"], r["kv_mode"])].append(r)

dense = by[(None, None, None)]
n = len(dense)
print(f"dense (DynamicCache): {sum(r['correct'] for r in dense):g}/{n} found, "
      f"{statistics.median(r['kv_cache_bytes'] for r in dense) / 2**20:.1f} MB after prefill, "
      f"{statistics.median(r['decode_ms_per_token'] for r in dense):.0f} ms per decoded token")
print()
print("| policy | budget | found, aware | found, agnostic | MB, aware | MB, agnostic | ms/token, aware | ms/token, agnostic |")
print("|---|---|---|---|---|---|---|---|")
for kv, budget in sorted({(k, b) for k, b, m in by if k is not None}):
    a, g = by[(kv, budget, "aware")], by[(kv, budget, "agnostic")]

    def found(rs):
        return f"{sum(r['correct'] for r in rs):g}/{len(rs)}"

    def mb(rs):
        return f"{statistics.median(r['kv_cache_bytes'] for r in rs) / 2**20:.1f}"

    def ms(rs):
        return f"{statistics.median(r['decode_ms_per_token'] for r in rs):.0f}"

    print(f"| `{kv}` | {budget} | {found(a)} | {found(g)} | {mb(a)} | {mb(g)} | {ms(a)} | {ms(g)} |")
