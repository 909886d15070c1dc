"""Report generation from synthetic evaluation rows: aggregates, CSV, recommendation, plots, report.md."""

import csv
import json
import math

import pytest

from attnsieve.eval.report import (
    SUMMARY_FIELDS,
    _accuracy_points,
    markdown_table,
    plot_all,
    recommend,
    summarize,
    write_report,
    write_summary_csv,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN = {"versions": {"attnsieve": "0.1.0", "torch": "2.5.0"}, "threads": 2, "seed": 7}
CONFIGS = {  # config label -> (method, params)
    "dense": ("dense", {}),
    "block-topk[density=0.1]": ("block-topk", {"density": 0.1}),
    "window[window=128]": ("window", {"window": 128}),
}
# (config, task, length) -> per-sample `correct`; block-topk is one sample below dense (accepted),
# window is two below (rejected) although it is faster. In kv/2048 block-topk also drops two samples.
CORRECT = {
    "dense": [1, 1, 1],
    "block-topk[density=0.1]": [1, 1, 0],
    "window[window=128]": [1, 0, 0],
}
RATIO = {"dense": [1.0, 1.1, 0.9], "block-topk[density=0.1]": [0.5, 0.3, 0.4], "window[window=128]": [0.2] * 3}
DENSITY = {"dense": [1.0] * 3, "block-topk[density=0.1]": [0.1, 0.12, 0.14], "window[window=128]": [0.05] * 3}


def _row(config, task, length, sample, **scores):
    method, params = CONFIGS[config]
    row = dict(method=method, params=params, config=config, task=task, haystack="essays", length=length,
               sample=sample, correct=None, kl=None, top1_agree=None, mass_covered=None, layer_rel_err={},
               density=None, prefill_s=None, dense_prefill_s=None, prefill_ratio=None, exact_ratio=None,
               estimate_s=None, decode_ms_per_token=None, peak_mem_mb=None, kv_cache_bytes=None, **RUN)
    row.update(scores)
    return row


def make_rows():
    rows = []
    for task in ("passkey", "kv"):
        for length in (1024, 2048):
            for config in CONFIGS:
                correct = CORRECT[config]
                if (task, length, config) == ("kv", 2048, "block-topk[density=0.1]"):
                    correct = [0, 0, 1]
                for i in range(3):
                    sparse = config != "dense"
                    rows.append(_row(
                        config, task, length, i, correct=float(correct[i]), density=DENSITY[config][i],
                        prefill_ratio=RATIO[config][i], kl=[0.1, 0.2, 0.3][i] if sparse else 0.0,
                        top1_agree=[1.0, 0.5, 0.75][i] if sparse else 1.0,
                        mass_covered=[0.9, None, 0.7][i] if config.startswith("block") else None,
                        decode_ms_per_token=[3.0, 5.0, 4.0][i], peak_mem_mb=[100.0, 300.0, 200.0][i],
                        kv_cache_bytes=1000 * (i + 1), prefill_s=0.1, dense_prefill_s=0.2,
                    ))
    for config, ppl, ratio in (("dense", 10.0, 1.0), ("block-topk[density=0.1]", 10.4, 0.5),
                               ("window[window=128]", 12.0, 0.3)):
        for i in range(2):
            rows.append(_row(config, "ppl", 1024, i, ppl=ppl + i, dense_ppl=10.0 + i, prefill_ratio=ratio,
                             density=DENSITY[config][i]))
    return rows


def _cell(summary, config, task, length):
    (s,) = [s for s in summary if (s["config"], s["task"], s["length"]) == (config, task, length)]
    return s


def test_summary_aggregates_hand_checked_cell():
    summary = summarize(make_rows())
    assert len(summary) == 3 * 2 * 2 + 3
    s = _cell(summary, "block-topk[density=0.1]", "passkey", 1024)
    assert s["n"] == 3
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["accuracy_std_err"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))  # stdev of [1, 1, 0]
    assert s["density"] == pytest.approx(0.12)  # mean
    assert s["prefill_ratio"] == pytest.approx(0.4)  # median of [0.5, 0.3, 0.4]
    assert s["decode_ms_per_token"] == pytest.approx(4.0)  # median of [3, 5, 4]
    assert s["kl"] == pytest.approx(0.2)
    assert s["top1_agree"] == pytest.approx(0.75)
    assert s["peak_mem_mb"] == 300.0 and s["kv_cache_bytes"] == 3000  # max
    assert s["params"] == {"density": 0.1} and s["method"] == "block-topk" and s["haystack"] == "essays"
    assert set(s) == set(SUMMARY_FIELDS)


def test_summary_median_differs_from_mean():
    rows = [_row("dense", "t", 64, i, prefill_ratio=r, correct=1.0) for i, r in enumerate([1.0, 1.0, 4.0])]
    (s,) = summarize(rows)
    assert s["prefill_ratio"] == 1.0  # the mean would be 2.0


def test_summary_ignores_none_and_reports_empty_fields_as_none():
    summary = summarize(make_rows())
    block = _cell(summary, "block-topk[density=0.1]", "passkey", 1024)
    assert block["mass_covered"] == pytest.approx(0.8)  # mean of [0.9, 0.7]; the None is skipped
    window = _cell(summary, "window[window=128]", "passkey", 1024)
    assert window["mass_covered"] is None and window["exact_ratio"] is None and window["ppl"] is None
    ppl = _cell(summary, "dense", "ppl", 1024)
    assert ppl["accuracy"] is None and ppl["accuracy_std_err"] is None
    assert ppl["ppl"] == pytest.approx(10.5) and ppl["dense_ppl"] == pytest.approx(10.5)


def test_summary_handles_missing_fields_and_rejects_bad_values():
    (s,) = summarize([{"method": "dense", "task": "t", "correct": True}])
    assert s["config"] == "dense" and s["accuracy"] == 1.0 and s["density"] is None and s["length"] is None
    (s,) = summarize([{"method": "window", "params": {"window": 8}, "task": "t"}])
    assert s["config"] == "window[window=8]"
    with pytest.raises(ValueError, match="'correct'.*'yes'"):
        summarize([{"method": "dense", "task": "t", "correct": "yes"}])
    with pytest.raises(ValueError, match="no 'task'"):
        summarize([{"method": "dense"}])


def test_csv_round_trip(tmp_path):
    summary = summarize(make_rows())
    path = write_summary_csv(summary, tmp_path / "sub" / "summary.csv")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == SUMMARY_FIELDS
        back = list(reader)
    assert len(back) == len(summary)
    for s, b in zip(summary, back, strict=True):
        assert b["config"] == s["config"] and int(b["length"]) == s["length"] and int(b["n"]) == s["n"]
        assert json.loads(b["params"]) == s["params"]
        assert (b["accuracy"] == "") if s["accuracy"] is None else float(b["accuracy"]) == pytest.approx(s["accuracy"])
    assert back[1]["params"] == '{"density":0.1}'  # compact JSON (back[0] is dense, sorted first)


def _rec(recs, task, length):
    (r,) = [r for r in recs if (r["task"], r["length"]) == (task, length)]
    return r


def test_recommend_fastest_within_one_sample_and_rejects_faster_less_accurate():
    recs = recommend(summarize(make_rows()))
    assert len(recs) == 5
    r = _rec(recs, "passkey", 1024)
    # window is faster (0.2) but two samples below dense; block-topk is exactly one below (2/3 >= 1 - 1/3).
    assert r["config"] == "block-topk[density=0.1]"
    assert r["accuracy"] == pytest.approx(2 / 3) and r["prefill_ratio"] == pytest.approx(0.4)
    assert r["density"] == pytest.approx(0.12) and r["dense_accuracy"] == 1.0
    assert "window[window=128] rejected" in r["reason"]


def test_recommend_says_when_dense_is_the_only_choice():
    r = _rec(recommend(summarize(make_rows())), "kv", 2048)
    assert r["config"] == "dense"
    assert "dense is the only configuration" in r["reason"]


def test_recommend_perplexity_uses_five_percent_rule():
    r = _rec(recommend(summarize(make_rows())), "ppl", 1024)
    assert r["config"] == "block-topk[density=0.1]"  # 10.9 vs dense 10.5 is within 5%; window's 12.5 is not
    assert "ppl" in r["reason"] and "window[window=128] rejected" in r["reason"]


def test_recommend_without_dense_baseline():
    rows = [r for r in make_rows() if not (r["task"] == "kv" and r["method"] == "dense")]
    recs = recommend(summarize(rows))
    for length in (1024, 2048):
        r = _rec(recs, "kv", length)
        assert r["config"] is None and r["reason"] == "no dense baseline"
    assert _rec(recs, "passkey", 1024)["config"] == "block-topk[density=0.1]"


def test_markdown_table_formats_and_escapes():
    table = markdown_table([{"a": 0.123456, "b": None, "c": "x|y"}, {"a": 12345.6, "b": 3, "c": {"k": 1}}],
                           [("A", "a"), "b", ("C", "c")])
    lines = table.strip().split("\n")
    assert lines[0] == "| A | b | C |"
    assert lines[2] == "| 0.123 | - | x\\|y |"
    assert lines[3] == '| 12346 | 3 | {"k":1} |'
    with pytest.raises(ValueError, match="column"):
        markdown_table([], [])


def test_write_report_creates_all_artefacts(tmp_path):
    command = "attnsieve eval --methods dense,block-topk,window --lengths 1024,2048 --out runs/x"
    path = write_report(make_rows(), tmp_path, command)
    assert path == tmp_path / "report.md"
    assert (tmp_path / "summary.csv").exists()
    for name in ("accuracy_vs_density.png", "fidelity_vs_density.png", "prefill_vs_length.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE, name
    text = path.read_text()
    assert f"```\n{command}\n```" in text
    assert "threads: 2" in text and "seed: 7" in text and "torch 2.5.0" in text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[-1] == "## Recommendation"
    assert headings == ["## Command", "## Run info", "## Results", "## Plots", "## Definitions", "## Recommendation"]
    assert "### passkey" in text and "### kv" in text and "### Perplexity: ppl" in text
    assert "](accuracy_vs_density.png)" in text
    recommendation = text.split("## Recommendation", 1)[1]
    assert "block-topk[density=0.1]" in recommendation and "| kv | essays | 2048 | dense |" in recommendation


def test_plot_all_skips_empty_plots(tmp_path):
    rows = [_row(c, "passkey", 1024, i, correct=1.0, density=DENSITY[c][i]) for c in CONFIGS for i in range(2)]
    written = plot_all(rows, summarize(rows), tmp_path)
    assert [p.name for p in written] == ["accuracy_vs_density.png"]
    assert not (tmp_path / "fidelity_vs_density.png").exists()
    assert plot_all([], [], tmp_path / "empty") == []


def test_accuracy_plot_averages_when_tasks_are_many():
    rows = [_row("dense", f"t{k}", 1024, 0, correct=float(k % 2), density=None) for k in range(5)]
    panels = _accuracy_points(summarize(rows))
    assert list(panels) == ["mean over 5 tasks"]
    assert panels["mean over 5 tasks"] == [("dense", 1.0, pytest.approx(0.4))]  # dense sits at density 1
