"""Tables of the issue-12 grid (passkey-repeat.jsonl and niah-prose.jsonl in this folder) for the docs.

python docs/results/prefill-faithful-4k/table.py  (from the repository root)

Table 1: keys found per method, density and mode, on both tasks. Table 2: fidelity at density 0.2
(KL and top-1 as generation runs, exact attention mass covered, measured density), means over the
samples. Table 3: the papers' own settings (no density), pass-key (defaults-passkey-repeat.jsonl).
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

from attnsieve.methods import describe

here = Path(__file__).parent
TASKS = [("passkey-repeat.jsonl", "passkey (repeat)"), ("niah-prose.jsonl", "niah_single (prose)")]
rows = defaultdict(list)  # (method, density, causal_param, task) -> rows
for fname, task in TASKS:
    path = here / fname
    if not path.exists():
        continue
    for line in path.read_text().splitlines():
        r = json.loads(line)
        causal = bool(r["params"].get("causal", False))
        dens = r["params"].get("density", 1.0 if r["method"] == "dense" else None)
        rows[(r["method"], dens, causal, task)].append(r)

methods = sorted({k[0] for k in rows}, key=lambda m: (m != "dense", m))
lookahead = {m for m in methods if describe(m)["lookahead"]}


def cell(m, d, c, task):
    rs = rows.get((m, d, c, task))
    return f"{sum(r['correct'] for r in rs):g}/{len(rs)}" if rs else ""


cols = [(0.1, False), (0.2, False), (0.2, True)]
head = ["method", "look-ahead default"]
for _, task in TASKS:
    head += [f"{task} d=0.1", f"{task} d=0.2", f"{task} d=0.2 causal=True"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for m in methods:
    line = [f"`{m}`", "yes" if m in lookahead else "no"]
    for _, task in TASKS:
        if m == "dense":
            line += [cell(m, 1.0, False, task), "", ""]
        else:
            line += [cell(m, d, c, task) for d, c in cols]
    print("| " + " | ".join(line) + " |")

print()
print("| task | method | causal | measured density | KL(dense‖method) | top-1 | mass covered | n |")
print("|---|---|---|---|---|---|---|---|")
for _, task in TASKS:
    for m in methods:
        for c in (False, True):
            rs = rows.get((m, 1.0 if m == "dense" else 0.2, c, task))
            if not rs:
                continue
            mean = {k: statistics.mean(r[k] for r in rs) for k in ("density", "kl", "top1_agree", "mass_covered")}
            print(f"| {task} | `{m}` | {str(c).lower()} | {mean['density']:.3f} | {mean['kl']:.3f} "
                  f"| {mean['top1_agree']:.2f} | {mean['mass_covered']:.3f} | {len(rs)} |")

defaults = here / "defaults-passkey-repeat.jsonl"
if defaults.exists():
    by = defaultdict(list)
    for line in defaults.read_text().splitlines():
        r = json.loads(line)
        by[r["method"]].append(r)
    print()
    print("| method | found | measured density | KL(dense‖method) | top-1 | mass covered | n |")
    print("|---|---|---|---|---|---|---|")
    for m, rs in sorted(by.items()):
        mean = {k: statistics.mean(r[k] for r in rs) for k in ("density", "kl", "top1_agree", "mass_covered")}
        print(f"| `{m}` | {sum(r['correct'] for r in rs):g}/{len(rs)} | {mean['density']:.3f} | {mean['kl']:.3f} "
              f"| {mean['top1_agree']:.2f} | {mean['mass_covered']:.3f} | {len(rs)} |")
