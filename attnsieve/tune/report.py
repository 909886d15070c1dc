"""The validation report of `tune --validate`, written next to the plan file.

For `--out plan.json`: `plan.validation.json` (the numbers), `plan.validation.md` (the tables)
and `plan.frontier.png`: cost (measured density, or the profiled attention time ratio with
`--objective time`) against held-out KL, uniform configurations as points (one colour per method),
the plans for several targets as a line, the written plan starred and the best uniform configuration
of equal or better KL circled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def paths(plan_path: str | os.PathLike) -> dict[str, Path]:
    """Where the report files of a plan go: next to it, named after it."""
    p = Path(plan_path)
    stem = p.with_suffix("") if p.suffix == ".json" else p
    return {"json": Path(f"{stem}.validation.json"), "markdown": Path(f"{stem}.validation.md"),
            "plot": Path(f"{stem}.frontier.png")}


def _x(row: dict, objective: str) -> float:
    return row["measured_density"] if objective == "density" else row["time_ratio"]


def plot_frontier(v: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obj = v["objective"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({u["method"] for u in v["uniform"]})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for m in methods:
        rows = sorted((u for u in v["uniform"] if u["method"] == m), key=lambda u: _x(u, obj))
        ax.scatter([_x(u, obj) for u in rows], [u["kl"] for u in rows], color=colours[m], label=f"{m} (uniform)",
                   zorder=3)
    line = sorted([*v["frontier"], v["dense"]], key=lambda r: _x(r, obj))  # the line ends at exact attention
    ax.plot([_x(r, obj) for r in line], [r["kl"] for r in line], "-", color="black", marker="s", ms=4,
            label="plans (several targets; exact at KL 0)", zorder=4)
    ax.scatter([_x(v["plan"], obj)], [v["plan"]["kl"]], marker="*", s=220, color="gold", edgecolor="black",
               label="the plan", zorder=5)
    best = v["best_uniform"]
    ax.scatter([_x(best, obj)], [best["kl"]], s=260, facecolor="none", edgecolor="red", linewidth=1.5,
               label=f"best uniform, KL <= plan's ({best['config']})", zorder=6)
    kls = [r["kl"] for r in [*v["uniform"], *line] if r["kl"] > 0]
    ax.set_yscale("symlog", linthresh=max(min(kls, default=1e-4), 1e-6))
    ax.set_xlabel("measured density (held-out)" if obj == "density" else "attention time / exact (profiled)")
    ax.set_ylabel("KL(dense || config), held-out")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "tuned plans against uniform configurations")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(v: dict, plan_label: str) -> str:
    obj = v["objective"]
    cost = "measured density" if obj == "density" else "time ratio"

    def row(name: str, r: dict) -> str:
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
        return (f"| {name} | {r['kl']:.4g} | {r['top1']:.3f} | {acc} | {r['measured_density']:.3f} | "
                f"{r['time_ratio']:.3f} |")

    head = "| configuration | KL | top-1 | accuracy | measured density | time ratio |\n|---|---|---|---|---|---|"
    items = v["prompts"]["items"]
    lines = [
        f"# Validation of {plan_label}", "",
        f"{v['prompts']['prompts']} held-out prompt(s) (eval's seeds and depths; haystack "
        f"{', '.join(sorted({i['haystack'] for i in items}))}; tasks {', '.join(sorted({i['task'] for i in items}))}; "
        f"lengths {', '.join(map(str, v['prompts']['lengths']))}); objective: {cost}. "
        f"{v['full_forwards']} full forwards, {v['seconds']:.0f} s.", "",
        head, row("dense", v["dense"]), row("the plan", v["plan"]),
        row(f"best uniform of equal or better KL: {v['best_uniform']['config']}", v["best_uniform"]), "",
        f"Plan / best uniform ({cost}): "
        + ("-" if v["cost_vs_best_uniform"] is None else f"{v['cost_vs_best_uniform']:.3f}")
        + f"; accuracy plan - dense: {v['accuracy_vs_dense']:+.2f}.", "",
        "## Uniform configurations", "", head, *[row(u["config"], u) for u in v["uniform"]], "",
        "## Plans at several targets", "", head, *[row(f["label"] + (" (the plan)" if f["chosen"] else ""), f)
                                                  for f in v["frontier"]], "",
        "![frontier](" + v.get("plot", "frontier.png") + ")", "",
    ]
    return "\n".join(lines)


def write(v: dict, plan_path: str | os.PathLike, plan_label: str, extra: dict | None = None) -> dict[str, Path]:
    """Write the JSON, the markdown and the plot next to the plan; returns their paths."""
    out = paths(plan_path)
    v = {**v, "plot": out["plot"].name}
    plot_frontier(v, out["plot"], f"{plan_label}: held-out KL against cost")
    out["markdown"].write_text(markdown(v, plan_label))
    out["json"].write_text(json.dumps({**v, **(extra or {})}, indent=1, default=str) + "\n")
    return out
