"""Turn evaluation rows (`results.jsonl`) into a summary CSV, plots, a recommendation and `report.md`.

Each input row is one (method config, task, length, sample) measurement written by the runner.
`summarize` aggregates them per (config, method, task, haystack, length): accuracy, KL and
agreement are means, timing ratios are medians of per-sample ratios (each taken against stock
SDPA in the same process), memory is the maximum. `None` values are ignored; a field with no
values at all stays `None`. The configuration whose method is "dense" is the reference.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

DENSE = "dense"
PPL_TOLERANCE = 0.05  # a perplexity cell accepts configs whose ppl is at most 5% above dense
KL_FLOOR = 1e-6  # KL values are clipped here before a log-scale plot (dense has KL = 0)
MAX_TASK_PANELS = 4  # more tasks than this: the accuracy plot averages over tasks in one panel

# summary field -> (row field it aggregates, how)
_AGGREGATES: dict[str, tuple[str, Callable]] = {
    "accuracy": ("correct", statistics.fmean),
    "density": ("density", statistics.fmean),
    "prefill_ratio": ("prefill_ratio", statistics.median),
    "exact_ratio": ("exact_ratio", statistics.median),
    "kl": ("kl", statistics.fmean),
    "top1_agree": ("top1_agree", statistics.fmean),
    "mass_covered": ("mass_covered", statistics.fmean),
    "decode_ms_per_token": ("decode_ms_per_token", statistics.median),
    "decode_attn_ms_per_token": ("decode_attn_ms_per_token", statistics.median),
    "peak_mem_mb": ("peak_mem_mb", max),
    "kv_cache_bytes": ("kv_cache_bytes", max),
    "ppl": ("ppl", statistics.fmean),
    "dense_ppl": ("dense_ppl", statistics.fmean),
    # the rerank task: nDCG@10 of ICR, its seconds per ranking, and the BM25 / random-order baselines
    "ndcg10": ("ndcg10", statistics.fmean),
    "rerank_s": ("rerank_s", statistics.median),
    "bm25_correct": ("bm25_correct", statistics.fmean),
    "bm25_ndcg10": ("bm25_ndcg10", statistics.fmean),
    "random_correct": ("random_correct", statistics.fmean),
    "random_ndcg10": ("random_ndcg10", statistics.fmean),
}
RERANK_TASK = "rerank"
KEY_FIELDS = ["config", "method", "task", "haystack", "length", "dtype"]
SUMMARY_FIELDS = KEY_FIELDS + ["n", "accuracy", "accuracy_std_err"] + list(_AGGREGATES)[1:] + ["params"]


def _num(row: dict, key: str, index: int):
    """The numeric value of `row[key]` (int kept as int), or None when missing."""
    v = row.get(key)
    if v is None:
        return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v
    raise ValueError(f"row {index}: field {key!r} must be a number or None, got {v!r}")


def _config_label(row: dict) -> str:
    if row.get("config"):
        return row["config"]
    params = row.get("params") or {}
    inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{row['method']}[{inner}]" if inner else row["method"]


def _is_dense(row: dict) -> bool:
    return row.get("method") == DENSE or row.get("config") == DENSE


def _sort_key(s: dict) -> tuple:
    """Order rows by cell, dense first within a cell, then by config label."""
    length = s.get("length")
    return (s["task"], s.get("haystack") or "", -1 if length is None else length, s.get("dtype") or "",
            not _is_dense(s), s["config"])


def summarize(rows: Iterable[dict]) -> list[dict]:
    """One row per (config, method, task, haystack, length) with the aggregates in SUMMARY_FIELDS."""
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"row {i} must be a dict, got {type(row).__name__}")
        if not row.get("task"):
            raise ValueError(f"row {i} has no 'task': {row!r}")
        if not row.get("method") and not row.get("config"):
            raise ValueError(f"row {i} has neither 'method' nor 'config': {row!r}")
        key = (_config_label(row), row.get("method") or row.get("config"), row["task"], row.get("haystack"),
               row.get("length"), row.get("dtype") or "float32")  # rows before dtype was recorded: float32
        groups.setdefault(key, []).append((i, row))

    summary = []
    for key, members in groups.items():
        s = dict(zip(KEY_FIELDS, key, strict=True))
        s["n"] = len(members)
        for name, (field, agg) in _AGGREGATES.items():
            values = [v for i, r in members if (v := _num(r, field, i)) is not None]
            s[name] = agg(values) if values else None
        correct = [v for i, r in members if (v := _num(r, "correct", i)) is not None]
        s["accuracy_std_err"] = statistics.stdev(correct) / math.sqrt(len(correct)) if len(correct) > 1 else None
        s["params"] = dict(members[0][1].get("params") or {})
        summary.append(s)
    return sorted(summary, key=_sort_key)


def _compact_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def write_summary_csv(summary: Sequence[dict], path) -> Path:
    """Write the summary as CSV (header = SUMMARY_FIELDS, None -> empty, params as compact JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for s in summary:
            w.writerow({k: _compact_json(s.get(k) or {}) if k == "params" else
                        ("" if s.get(k) is None else s[k]) for k in SUMMARY_FIELDS})
    return path


def _criterion(dense: dict) -> tuple[Callable[[dict], bool], str] | None:
    """The acceptance test for one cell, measured against its dense row, and its description."""
    if dense["accuracy"] is not None:
        threshold = dense["accuracy"] - 1 / dense["n"]
        desc = f"accuracy >= {threshold:.3g} (dense {dense['accuracy']:.3g} - 1/{dense['n']})"
        return (lambda s: s["accuracy"] is not None and s["accuracy"] >= threshold - 1e-9), desc
    ref = dense["ppl"] if dense["ppl"] is not None else dense["dense_ppl"]
    if ref is not None:
        limit = ref * (1 + PPL_TOLERANCE)
        desc = f"ppl <= {limit:.3g} (within {PPL_TOLERANCE:.0%} of dense {ref:.3g})"
        return (lambda s: s["ppl"] is not None and s["ppl"] <= limit * (1 + 1e-12)), desc
    return None


def _speed_key(s: dict) -> tuple:
    """Fastest first: lowest median prefill_ratio (unknown last), then lowest density, then label."""
    ratio = s["prefill_ratio"] if s["prefill_ratio"] is not None else math.inf
    return (ratio, s["density"] if s["density"] is not None else 1.0, s["config"])


def recommend(summary: Sequence[dict]) -> list[dict]:
    """Per (task, haystack, length, dtype): the fastest config whose quality is within one sample of
    dense in the same dtype.

    Quality means accuracy >= dense accuracy - 1/n (n = dense samples in the cell), or for a
    perplexity cell (dense accuracy None) ppl within 5% of dense. Each result carries the cell key,
    the chosen `config` (None when the cell has no dense row), its accuracy, ppl, density,
    prefill_ratio, n, the dense reference values and a `reason`.
    """
    cells: dict[tuple, list[dict]] = {}
    for s in summary:
        cells.setdefault((s["task"], s.get("haystack"), s.get("length"), s.get("dtype")), []).append(s)

    out = []
    for (task, haystack, length, dtype), members in cells.items():
        rec = dict(task=task, haystack=haystack, length=length, dtype=dtype, config=None, method=None, params=None,
                   n=None, accuracy=None, ppl=None, density=None, prefill_ratio=None,
                   dense_accuracy=None, dense_ppl=None)
        dense = next((s for s in members if s["config"] == DENSE), None) or next(
            (s for s in members if _is_dense(s)), None)
        if dense is None:
            out.append({**rec, "reason": "no dense baseline"})
            continue
        rec.update(dense_accuracy=dense["accuracy"], dense_ppl=dense["ppl"])
        crit = _criterion(dense)
        if crit is None:
            out.append({**rec, "reason": "dense baseline has neither accuracy nor ppl"})
            continue
        ok, desc = crit
        passing = sorted((s for s in members if s is dense or ok(s)), key=_speed_key)
        best = passing[0]
        passed = {id(s) for s in passing}
        faster_rejected = [s for s in sorted(members, key=_speed_key)
                           if id(s) not in passed and _speed_key(s) < _speed_key(best)]
        if len(passing) == 1:
            reason = f"dense is the only configuration with {desc}"
        elif best is dense:
            reason = f"dense is the fastest of {len(passing)} configurations with {desc}"
        else:
            reason = f"fastest of {len(passing)} configurations with {desc}"
        if faster_rejected:
            r = faster_rejected[0]
            quality = f"accuracy {_fmt(r['accuracy'])}" if dense["accuracy"] is not None else f"ppl {_fmt(r['ppl'])}"
            reason += f"; faster {r['config']} rejected ({quality})"
        rec.update({k: best[k] for k in ("config", "method", "params", "n", "accuracy", "ppl", "density",
                                         "prefill_ratio")})
        out.append({**rec, "reason": reason})
    return out


def _fmt(v) -> str:
    """3 significant digits for floats (whole numbers from 1000 up), integers as they are, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    if isinstance(v, dict):
        return _compact_json(v)
    return str(v)


def markdown_table(summary_rows: Sequence[dict], columns: Sequence[str | tuple[str, str]]) -> str:
    """A markdown table; each column is a row key (also the header) or a (header, key) pair."""
    if not columns:
        raise ValueError("markdown_table needs at least one column, got []")
    cols = [(c, c) if isinstance(c, str) else tuple(c) for c in columns]
    for c in cols:
        if len(c) != 2:
            raise ValueError(f"a column is a key or a (header, key) pair, got {c!r}")

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in summary_rows:
        lines.append("| " + " | ".join(cell(_fmt(r.get(k))) for _, k in cols) + " |")
    return "\n".join(lines) + "\n"


def _plot_density(s: dict) -> float | None:
    """The x position of a summary row on a density axis: dense sits at 1 when unmeasured."""
    if s["density"] is None and _is_dense(s):
        return 1.0
    return s["density"]


def _styles(methods: Iterable[str]) -> dict[str, dict]:
    markers = "osD^v<>ph*"
    names = sorted(set(methods))
    return {m: dict(color=f"C{i % 10}", marker=markers[i % len(markers)]) for i, m in enumerate(names)}


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _accuracy_points(summary: Sequence[dict]) -> dict[str, list[tuple[str, float, float]]]:
    """Panel title -> [(method, density, accuracy)]; one panel per task, or one averaged panel."""
    rows = [s for s in summary if s["accuracy"] is not None and _plot_density(s) is not None]
    tasks = sorted({s["task"] for s in rows})
    if len(tasks) <= MAX_TASK_PANELS:
        return {t: [(s["method"], _plot_density(s), s["accuracy"]) for s in rows if s["task"] == t] for t in tasks}
    # Many tasks: average accuracy and density over tasks per (config, haystack, length).
    groups: dict[tuple, list[dict]] = {}
    for s in rows:
        groups.setdefault((s["config"], s["method"], s.get("haystack"), s.get("length"), s.get("dtype")),
                          []).append(s)
    points = [(k[1], statistics.fmean(_plot_density(s) for s in g), statistics.fmean(s["accuracy"] for s in g))
              for k, g in groups.items()]
    return {f"mean over {len(tasks)} tasks": points}


def plot_all(rows: Sequence[dict], summary: Sequence[dict], out_dir) -> list[Path]:
    """Write accuracy_vs_density.png, fidelity_vs_density.png and prefill_vs_length.png into out_dir.

    A plot whose data is empty is not written and not returned.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    style = _styles([s["method"] for s in summary] + [r.get("method") or r.get("config") for r in rows])
    written = []

    panels = _accuracy_points(summary)
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
        for ax, (title, points) in zip(axes[0], panels.items(), strict=True):
            for m in sorted({p[0] for p in points}):
                xs, ys = zip(*[(x, y) for pm, x, y in points if pm == m], strict=True)
                ax.scatter(xs, ys, label=m, **style[m])
            ax.set(title=title, xlabel="measured density", ylabel="accuracy", ylim=(-0.05, 1.05))
            _legend(ax)
        fig.suptitle("Accuracy against measured density (dense at 1)")
        written.append(_save(fig, out_dir / "accuracy_vs_density.png", plt))

    kl = [(s["method"], _plot_density(s), max(s["kl"], KL_FLOOR)) for s in summary
          if s["kl"] is not None and _plot_density(s) is not None]
    agree = [(s["method"], _plot_density(s), s["top1_agree"]) for s in summary
             if s["top1_agree"] is not None and _plot_density(s) is not None]
    if kl or agree:
        fig, (ax_kl, ax_ag) = plt.subplots(1, 2, figsize=(10, 4))
        for ax, points in ((ax_kl, kl), (ax_ag, agree)):
            for m in sorted({p[0] for p in points}):
                xs, ys = zip(*[(x, y) for pm, x, y in points if pm == m], strict=True)
                ax.scatter(xs, ys, label=m, **style[m])
            _legend(ax)
        if kl:
            ax_kl.set_yscale("log")
        ax_kl.set(title=f"KL(dense || method), clipped at {KL_FLOOR:g}", xlabel="measured density", ylabel="KL")
        ax_ag.set(title="Top-1 agreement with dense", xlabel="measured density", ylabel="top-1 agreement",
                  ylim=(-0.05, 1.05))
        fig.suptitle("Fidelity against measured density")
        written.append(_save(fig, out_dir / "fidelity_vs_density.png", plt))

    ratios: dict[str, dict[int, list[float]]] = {}
    methods: dict[str, str] = {}
    for i, r in enumerate(rows):
        v, length = _num(r, "prefill_ratio", i), r.get("length")
        if v is not None and length is not None:
            ratios.setdefault(_config_label(r), {}).setdefault(length, []).append(v)
            methods[_config_label(r)] = r.get("method") or r.get("config")
    if ratios:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, config in enumerate(sorted(ratios)):
            lengths = sorted(ratios[config])
            ax.plot(lengths, [statistics.median(ratios[config][n]) for n in lengths], label=config,
                    marker=style[methods[config]]["marker"], color=f"C{i % 10}")
        ax.axhline(1.0, linestyle="--", color="gray", label="stock SDPA")
        all_lengths = sorted({n for c in ratios.values() for n in c})
        if len(all_lengths) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(all_lengths, [str(n) for n in all_lengths])
        ax.minorticks_off()
        ax.set(title="Prefill time relative to stock SDPA (median over samples)", xlabel="context length (tokens)",
               ylabel="prefill_ratio")
        _legend(ax)
        written.append(_save(fig, out_dir / "prefill_vs_length.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _is_rerank_task(task_rows: Sequence[dict]) -> bool:
    return all(s["task"] == RERANK_TASK for s in task_rows)


def _is_ppl_task(task_rows: Sequence[dict]) -> bool:
    return all(s["accuracy"] is None for s in task_rows) and any(s["ppl"] is not None for s in task_rows)


DEFINITIONS = (
    "**Measured density** = computed query-key cells / exact (causal) cells, as counted by the method "
    "while it ran. **prefill_ratio** = method prefill time / stock SDPA prefill time measured in the same "
    "process on the same input; the table shows the median over samples, and below 1 means faster than "
    "stock SDPA. **Accuracy** is the mean task score over samples. **KL** is KL(dense || method) over the "
    "answer span, measured as generation runs (the prompt prefilled with the method, the answer fed token by "
    "token over that cache), and **top-1 agreement** the fraction of its positions where the method's "
    "argmax token equals dense's. A recommendation is the configuration with the lowest median "
    "prefill_ratio whose accuracy is at least dense accuracy - 1/n (within one sample of dense), or for "
    f"perplexity whose ppl is within {PPL_TOLERANCE:.0%} of dense. In the rerank task, **top-1** is the share "
    "of samples whose relevant passage ICR ranked first, **nDCG@10** its mean nDCG@10 (one relevant passage: "
    "1 / log2(rank + 1)), **seconds** the median time of one ranking (prefix, query and calibration passes), "
    "and BM25 and random order rank the same passages."
)


def write_report(rows: Sequence[dict], out_dir, command: str) -> Path:
    """Write summary.csv, the plots and report.md into out_dir; returns the path of report.md."""
    rows = list(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    write_summary_csv(summary, out_dir / "summary.csv")
    plots = plot_all(rows, summary, out_dir)
    recs = recommend([s for s in summary if s["task"] != RERANK_TASK])  # rerank rows have no prefill timing

    md = ["# attnsieve evaluation report", "", "## Command", "", "```", command, "```", "", "## Run info", ""]
    first = rows[0] if rows else {}
    versions = first.get("versions") or {}
    md.append("- versions: " + (", ".join(f"{k} {v}" for k, v in versions.items()) if versions else "-"))
    md += [f"- threads: {_fmt(first.get('threads'))}", f"- seed: {_fmt(first.get('seed'))}",
           f"- rows: {len(rows)}", ""]

    tasks: dict[str, list[dict]] = {}
    for s in summary:
        tasks.setdefault(s["task"], []).append(s)
    haystack = [("haystack", "haystack")] if any(s.get("haystack") is not None for s in summary) else []
    md += ["## Results", ""]
    if not summary:
        md += ["No results.", ""]
    ppl_tasks = {t: ss for t, ss in tasks.items() if _is_ppl_task(ss)}
    # runs with KV-cache policies also show what decoding keeps in memory and how fast it steps
    kv_cols = [("KV bytes", "kv_cache_bytes"), ("decode ms/token", "decode_ms_per_token"),
               ("decode attention ms/token", "decode_attn_ms_per_token")] if any(
        r.get("kv") for r in rows) else []
    for task, ss in tasks.items():
        if task in ppl_tasks:
            continue
        if _is_rerank_task(ss):
            md += [f"### Re-ranking: {task}", "", markdown_table(ss, [
                ("config", "config"), ("length", "length"), ("n", "n"), ("top-1", "accuracy"), ("nDCG@10", "ndcg10"),
                ("measured density", "density"), ("seconds", "rerank_s"), ("BM25 top-1", "bm25_correct"),
                ("BM25 nDCG@10", "bm25_ndcg10"), ("random top-1", "random_correct"),
                ("random nDCG@10", "random_ndcg10")])]
            continue
        md += [f"### {task}", "", markdown_table(ss, [("config", "config"), *haystack, ("length", "length"),
               ("n", "n"), ("accuracy", "accuracy"), ("measured density", "density"),
               ("prefill_ratio", "prefill_ratio"), ("KL", "kl"), ("top-1 agreement", "top1_agree"), *kv_cols])]
    for task, ss in ppl_tasks.items():
        md += [f"### Perplexity: {task}", "", markdown_table(ss, [("config", "config"), *haystack,
               ("length", "length"), ("n", "n"), ("ppl", "ppl"), ("dense ppl", "dense_ppl"),
               ("measured density", "density"), ("prefill_ratio", "prefill_ratio"), ("KL", "kl"),
               ("top-1 agreement", "top1_agree")])]

    if plots:
        md += ["## Plots", ""]
        md += [f"![{p.stem.replace('_', ' ')}]({p.name})\n" for p in plots]
    md += ["## Definitions", "", DEFINITIONS, ""]

    md += ["## Recommendation", "",
           "For each task and length, the fastest configuration whose accuracy is within one sample of dense "
           f"(for perplexity: ppl within {PPL_TOLERANCE:.0%} of dense).", ""]
    if recs:
        md.append(markdown_table(recs, [("task", "task"), *haystack, ("length", "length"),
                                        ("recommended", "config"), ("accuracy", "accuracy"), ("ppl", "ppl"),
                                        ("measured density", "density"), ("prefill_ratio", "prefill_ratio"),
                                        ("reason", "reason")]))
    else:
        md.append("No results to recommend from.\n")
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path
