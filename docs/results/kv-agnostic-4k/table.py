"""Query-aware against query-agnostic KV compression, side by side, from results*.jsonl (two runs: the six
first policies, then kvzip and zipvl; each run has its own dense rows, identical in outcome).

python docs/results/kv-agnostic-4k/table.py  (from the repository root)
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

here = Path(__file__).parent
by = defaultdict(list)
LOADED = "results-kvzip-zipvl.jsonl"  # run while other jobs shared the 2 cores: its decode times are not shown
for path in [here / "results.jsonl", here / LOADED]:
    for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip()):
        r["_file"] = path.name
        if r["kv"] is None and any(d["sample"] == r["sample"] for d in by[(None, None, None)]):
            continue  # the second run's dense rows repeat the first's
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
        if any(r["_file"] == LOADED for r in rs):
            return "-"
        return f"{statistics.median(r['decode_ms_per_token'] for r in rs):.0f}"

    print(f"| `{kv}` | {budget} | {found(a)} | {found(g)} | {mb(a)} | {mb(g)} | {ms(a)} | {ms(g)} |")
print()
print("ms/token '-': measured while other jobs shared the machine (see the KV decoding speed page for timings).")
